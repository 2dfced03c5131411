"""Indian buffet process: the prior, a collapsed Gibbs sampler, and the stage-2 rank posterior.

``ibp.process``: restaurant and stick-breaking draws, left-ordered form, P([Z]).
``ibp.gibbs``: collapsed Gibbs for the linear-Gaussian latent feature model (Griffiths & Ghahramani).
``ibp.rank_posterior``: P(r | D), per-layer LoRA ranks as IBP row sums given the modality gaps;
its sampler is ``ibp.rank_sampler``, and ``ibp.mcmc_diagnostics`` holds R-hat and ESS.
"""
from ibp.gibbs import GibbsTrace, LinearGaussianIBP, collapsed_log_likelihood
from ibp.process import (
    harmonic,
    left_ordered_form,
    log_prob_lof,
    log_prob_sequential,
    sample_ibp,
    sample_stick_breaking,
    stick_breaking_missing_mass,
)
from ibp.mcmc_diagnostics import effective_sample_size, split_rhat
from ibp.rank_posterior import calibrate_beta, finite_prior_moments, sample_rank_posterior
from ibp.rank_sampler import IBPRankSampler, RankPosterior, initial_log_beta

__all__ = [
    "GibbsTrace", "LinearGaussianIBP", "collapsed_log_likelihood",
    "harmonic", "left_ordered_form", "log_prob_lof", "log_prob_sequential", "sample_ibp",
    "sample_stick_breaking", "stick_breaking_missing_mass",
    "IBPRankSampler", "RankPosterior", "calibrate_beta", "effective_sample_size",
    "finite_prior_moments", "initial_log_beta", "sample_rank_posterior", "split_rhat",
]
