"""Modality-gap metrics between source and target features at one layer, and per-layer gap profiles.

Stage 2 measures D_i at every block i of the body: how far the aligned target features are from
the source features. No single distance is canonical, so every metric is registered in
:data:`GAP_METRICS` under one signature, ``metric(source [m, d], target [n, d], **kw) -> float``:

    mmd                 unbiased multi-kernel Gaussian MMD^2, median-heuristic bandwidths
    mmd_source          the same MMD^2 with bandwidths fixed on the source alone (0.25x-64x its median)
    sliced_w2_source    sliced W_2 with every projection in units of the source's spread along it
    sliced_wasserstein  SW_2 over seeded random directions (exact 1-D transport per direction)
    sinkhorn            debiased entropic OT (geomloss Sinkhorn divergence, cost |x - y|^2 / 2)
    otdd                OTDD with the given labels (orca.align.otdd; needs source/target labels)
    pad                 proxy A-distance 2 (1 - 2 err) of a held-out linear domain classifier

All grow with a mean shift; all but the two ``*_source`` metrics are symmetric in their arguments
(those measure the target in the source's units, so the first argument must be the source). For two samples of one
distribution mmd and pad are ~0 up to noise (unbiased / balanced); the transport metrics keep a
positive finite-sample bias: small for sinkhorn at its default blur, O(n^-1/2) for
sliced_wasserstein, and for otdd the finite-sample bias of its label distances -- compare otdd
values only at equal sample and class sizes. otdd's numbers are in microsoft/otdd's (ORCA's)
convention: outer cost (|x - x'|^2 + W) / 2, W a debiased Sinkhorn divergence at eps 0.1 on the
full squared distance, eps 0.1, debiased.

Speed (the target: every metric on 5,000 x 5,000 features at all 24 Swin-B blocks in
~30 s on one H100): everything runs on the features' device as dense batched tensor ops; pad
trains its classifier with full-batch L-BFGS in torch when the features are on a GPU (sklearn on
CPU), on at most ``max_samples`` points per side; otdd caps its label distances at 128 points per class.

Scale: the OT-type metrics scale with the features, and Swin activations grow with depth, so
:func:`gap_profile` divides both sets of each layer by the source's root-mean-square deviation by
default (``standardize=True``): a gap is then measured in units of the source spread.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from datasets.registry import Registry
from orca.align.checks import check_features, check_labels
from orca.align.mmd import DEFAULT_MULTIPLIERS, gaussian_kernel, median_sq_distance, mmd2_unbiased
from orca.align.otdd import otdd

GAP_METRICS = Registry("gap metric")
LABELLED_METRICS = ("otdd",)


def _pair(source, target) -> Tuple[Tensor, Tensor]:
    source = check_features("source", source)
    target = check_features("target", target, source.shape[1], "source")
    return source, target.to(device=source.device, dtype=source.dtype)


@GAP_METRICS.register("mmd")
def mmd(source, target, *, multipliers: Sequence[float] = DEFAULT_MULTIPLIERS, max_median_samples: int = 1024,
        seed: int = 0) -> float:
    """Unbiased multi-kernel MMD^2 (0 in expectation for equal distributions).

    Args:
        source: ``[m, d]``, m >= 2.
        target: ``[n, d]``, n >= 2.
        multipliers: bandwidth multipliers around the pooled median squared distance.
        max_median_samples, seed: subsample for the median.
    """
    source, target = _pair(source, target)
    with torch.no_grad():
        return float(mmd2_unbiased(source, target, multipliers=multipliers,
                                   max_median_samples=max_median_samples, seed=seed))


#: Bandwidth multipliers of ``mmd_source``: from a quarter of the source's median squared distance
#: (local structure) to 64 times it, so a target far from the source still sits inside the range of
#: the widest kernels, where MMD^2 grows like the squared mean distance instead of flattening.
SOURCE_MULTIPLIERS = (0.25, 1.0, 4.0, 16.0, 64.0)


@GAP_METRICS.register("mmd_source")
def mmd_source(source, target, *, multipliers: Sequence[float] = SOURCE_MULTIPLIERS, max_median_samples: int = 1024,
               seed: int = 0) -> float:
    """Unbiased multi-kernel MMD^2 with the bandwidth fixed on the source features alone.

    Why not the pooled median (``mmd``): the pooled median distance grows as the target moves away,
    so the kernels widen with the gap and every far target scores the same ~1.25 (two
    well-separated clouds under the pooled-median kernels): the metric saturates exactly where the
    large-gap tasks sit. A bandwidth taken from the source alone measures every target in the same
    units, and the wide multipliers keep its far end from flattening (:data:`SOURCE_MULTIPLIERS`).

    Args:
        source: ``[m, d]``, m >= 2 (defines the bandwidth; not symmetric in the arguments).
        target: ``[n, d]``, n >= 2.
        multipliers: bandwidth multipliers around the source's median squared distance.
        max_median_samples, seed: subsample for that median.
    """
    source, target = _pair(source, target)
    with torch.no_grad():
        h = median_sq_distance(source, max_samples=max_median_samples, seed=seed)
        return float(mmd2_unbiased(source, target, multipliers=multipliers, bandwidth=float(h)))


def mmd_saturation(source, target, *, bandwidth: str = "source", multipliers: Optional[Sequence[float]] = None,
                   max_median_samples: int = 1024, seed: int = 0) -> float:
    """How close an MMD^2 is to its ceiling: MMD^2 / (K_ss + K_tt), in (-inf, 1].

    With k <= 1, MMD^2 = K_ss + K_tt - 2 K_st reaches K_ss + K_tt when the two clouds no longer see
    each other through any kernel (K_st -> 0); beyond that point a larger gap cannot score higher.
    A ratio near 1 therefore means "saturated": the value no longer orders targets by distance.

    Args:
        source, target: ``[m, d]``, ``[n, d]``.
        bandwidth: ``"source"`` (as ``mmd_source``) or ``"pooled"`` (as ``mmd``).
        multipliers: default: :data:`SOURCE_MULTIPLIERS` for ``"source"``, ``DEFAULT_MULTIPLIERS`` for ``"pooled"``.
        max_median_samples, seed: subsample for the median.
    """
    if bandwidth not in ("source", "pooled"):
        raise ValueError(f"bandwidth={bandwidth!r} must be 'source' or 'pooled'")
    source, target = _pair(source, target)
    mult = tuple(multipliers or (SOURCE_MULTIPLIERS if bandwidth == "source" else DEFAULT_MULTIPLIERS))
    with torch.no_grad():
        h = median_sq_distance(source, None if bandwidth == "source" else target, max_samples=max_median_samples,
                               seed=seed)

        def within(x: Tensor) -> Tensor:
            k = gaussian_kernel(x, x, h, mult)
            return (k.sum() - k.diagonal().sum()) / (x.shape[0] * (x.shape[0] - 1))

        kss, ktt = within(source), within(target)
        kst = gaussian_kernel(source, target, h, mult).mean()
        return float((kss + ktt - 2.0 * kst) / (kss + ktt))


def random_directions(dim: int, n_projections: int, seed: int, device=None, dtype=torch.float32) -> Tensor:
    """Seeded unit directions ``[dim, n_projections]`` (drawn on CPU so every device agrees).

    Args:
        dim: feature dimension d.
        n_projections: number of directions.
        seed: generator seed.
        device, dtype: of the returned tensor.
    """
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(dim, n_projections, generator=gen, dtype=torch.float64)
    return (theta / theta.norm(dim=0, keepdim=True)).to(device=device, dtype=dtype)


def _wasserstein_1d_pp(u: Tensor, v: Tensor, p: float) -> Tensor:
    """Exact W_p^p between uniform empirical measures, batched: ``u [P, n]``, ``v [P, m]`` -> ``[P]``.

    Why not sort-and-subtract: that needs n = m. Integrating |F_u^-1(t) - F_v^-1(t)|^p over the
    merged breakpoints {i/n} U {j/m} is exact for any sizes at O((n + m) log(n + m)).
    """
    n, m = u.shape[1], v.shape[1]
    u, v = u.sort(dim=1).values, v.sort(dim=1).values
    levels = torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n,
                        torch.arange(1, m + 1, dtype=torch.float64) / m]).sort().values
    widths = torch.diff(levels, prepend=levels.new_zeros(1))
    mid = levels - widths / 2
    iu = (mid * n).floor().long().clamp_(0, n - 1).to(u.device)
    iv = (mid * m).floor().long().clamp_(0, m - 1).to(u.device)
    gap = (u[:, iu] - v[:, iv]).abs().pow(p)
    return gap @ widths.to(device=u.device, dtype=u.dtype)


@GAP_METRICS.register("sliced_wasserstein")
def sliced_wasserstein(source, target, *, n_projections: int = 256, p: float = 2.0, seed: int = 0) -> float:
    """Sliced p-Wasserstein distance (mean over directions of W_p^p, to the power 1/p; as POT).

    Args:
        source: ``[m, d]``.
        target: ``[n, d]``.
        n_projections: random directions.
        p: transport exponent (>= 1).
        seed: seed of the directions (same directions for every call with this seed).
    """
    source, target = _pair(source, target)
    if n_projections < 1:
        raise ValueError(f"n_projections={n_projections} must be >= 1")
    if not p >= 1:
        raise ValueError(f"p={p} must be >= 1")
    with torch.no_grad():
        theta = random_directions(source.shape[1], n_projections, seed, source.device, source.dtype)
        wpp = _wasserstein_1d_pp((source @ theta).T, (target @ theta).T, p)
        return float(wpp.mean().pow(1.0 / p))


@GAP_METRICS.register("sliced_w2_source")
def sliced_w2_source(source, target, *, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced W_2 with each projection standardised by the source: a gap in source standard deviations.

    Why per projection: ``sliced_wasserstein`` on features standardised by their total spread
    (:func:`gap_profile`) still depends on the dimension (a unit-variance cloud has ~d^-1/2 spread
    along any one direction) and on how anisotropic the source is; dividing every 1-D projection by
    the source's own standard deviation along it makes the value "how many source spreads the target
    distribution is away", comparable across layers of any width and never bounded above.

    Args:
        source: ``[m, d]``, m >= 2 (defines the units; not symmetric in the arguments).
        target: ``[n, d]``.
        n_projections: random directions.
        seed: seed of the directions.
    """
    source, target = _pair(source, target)
    if n_projections < 1:
        raise ValueError(f"n_projections={n_projections} must be >= 1")
    if source.shape[0] < 2:
        raise ValueError(f"sliced_w2_source needs >= 2 source samples for a spread, got {source.shape[0]}")
    with torch.no_grad():
        theta = random_directions(source.shape[1], n_projections, seed, source.device, source.dtype)
        ps, pt = source @ theta, target @ theta
        mu, sd = ps.mean(0), ps.std(0).clamp_min(1e-12)
        w22 = _wasserstein_1d_pp(((ps - mu) / sd).T, ((pt - mu) / sd).T, 2.0)
        return float(w22.mean().sqrt())


@GAP_METRICS.register("sinkhorn")
def sinkhorn(source, target, *, blur: float = 0.5, scaling: float = 0.5, p: int = 2) -> float:
    """Debiased entropic OT (Sinkhorn divergence) from geomloss, eps = blur^p.

    Why blur = 0.5 and not geomloss' 0.05: on standardised features (unit total variance, mean
    cost |x - y|^2 / 2 ~ 1) a small blur approaches W_2^2, whose sample bias ~n^(-2/d) swamps
    the gap in high dimension -- two samples of one 128-d Gaussian (n = 1000) score 0.73 at
    blur 0.05 against 1.22 for a one-sigma shift, but 0.014 against 0.51 at blur 0.5.

    Args:
        source: ``[m, d]``.
        target: ``[n, d]``.
        blur: entropic length scale (geomloss); eps = blur ** p. The default suits standardised
            features (see :func:`gap_profile`).
        scaling: eps-annealing ratio (geomloss; closer to 1 is more accurate, slower).
        p: 1 or 2 (cost |x - y| or |x - y|^2 / 2).
    """
    from geomloss import SamplesLoss

    source, target = _pair(source, target)
    if p not in (1, 2):
        raise ValueError(f"p={p} must be 1 or 2")
    if not blur > 0 or not 0 < scaling < 1:
        raise ValueError(f"blur={blur} must be > 0 and scaling={scaling} in (0, 1)")
    loss = SamplesLoss("sinkhorn", p=p, blur=blur, scaling=scaling, debias=True, backend="tensorized")
    with torch.no_grad():
        return float(loss(source, target))


@GAP_METRICS.register("otdd")
def otdd_gap(source, target, *, source_labels=None, target_labels=None, inner: str = "sinkhorn",
             reg: float = 0.1, inner_max_samples: Optional[int] = 128, seed: int = 0) -> float:
    """OTDD between the labelled source and the labelled target (target labels may be k-means ids).

    In microsoft/otdd's convention for ORCA's call (``orca.align.otdd``): cost (|x - x'|^2 + W) / 2.

    Args:
        source: ``[m, d]``.
        target: ``[n, d]``.
        source_labels: ``[m]`` integer labels, >= 2 distinct (required).
        target_labels: ``[n]`` integer labels (required).
        inner: ``"sinkhorn"`` (microsoft/otdd's "exact"), ``"exact"`` (LP) or ``"gaussian"`` label distances.
        reg: entropic regularisation.
        inner_max_samples: per-class cap for the label distances (they dominate the cost: 190
            class pairs per layer, solved as one batch on the features' device).
        seed: seed of that subsample.
    """
    if source_labels is None or target_labels is None:
        raise ValueError("the otdd gap metric needs source_labels and target_labels (pass both)")
    source, target = _pair(source, target)
    with torch.no_grad():
        return float(otdd(target, target_labels, source, source_labels, inner=inner, reg=reg,
                          inner_max_samples=inner_max_samples, seed=seed))


def _balanced_split(m: int, n: int, max_samples: int, test_fraction: float, seed: int):
    """Equal-size seeded subsets of both sets, split into train/test index tensors.

    Why equal sizes: with unbalanced domains the majority vote already beats 50 % error and PAD
    would be positive for identical distributions. Why the same generator state for both sets:
    swapping source and target then swaps only the class labels, so PAD is exactly symmetric.
    """
    k = min(m, n, max_samples)
    n_test = max(1, int(round(k * test_fraction)))
    if k - n_test < 1:
        raise ValueError(f"pad needs >= 2 samples per set after the split (got {k} with test_fraction={test_fraction})")
    out = []
    for size in (m, n):
        perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:k]
        out.append((perm[n_test:], perm[:n_test]))
    return out


def _fit_logistic_torch(x: Tensor, y: Tensor, c: float, max_iter: int) -> Tuple[Tensor, Tensor]:
    """L2-penalised logistic regression with sklearn's objective, full-batch L-BFGS on x's device."""
    w = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros((), dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")
    scale = 1.0 / (2.0 * c * x.shape[0])  # sklearn: C * sum(loss) + |w|^2 / 2, divided by C * n

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + scale * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


@GAP_METRICS.register("pad")
def proxy_a_distance(source, target, *, max_samples: int = 2500, test_fraction: float = 0.5, C: float = 1.0,
                     max_iter: int = 200, backend: str = "auto", seed: int = 0) -> float:
    """Proxy A-distance (Ben-David et al. 2007): PAD = 2 (1 - 2 err) of a held-out linear domain classifier.

    Features are standardised with the training split's statistics; ``err`` is the error on the
    held-out split (balanced by construction). Values lie in [-2, 2]; ~0 when the domains match.

    Args:
        source: ``[m, d]``.
        target: ``[n, d]``.
        max_samples: points per set used at most (seeded subsample; both sets get the same count).
        test_fraction: held-out share.
        C: inverse L2 strength (sklearn's C).
        max_iter: solver iterations.
        backend: ``"sklearn"`` (LogisticRegression, lbfgs), ``"torch"`` (L-BFGS on the features'
            device), or ``"auto"`` (torch on GPU, sklearn on CPU).
        seed: seed of the subsample/split.
    """
    source, target = _pair(source, target)
    if backend not in ("auto", "sklearn", "torch"):
        raise ValueError(f"backend={backend!r} is not one of ('auto', 'sklearn', 'torch')")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1)")
    if not C > 0:
        raise ValueError(f"C={C} must be > 0")
    if backend == "auto":
        backend = "torch" if source.device.type != "cpu" else "sklearn"
    (s_tr, s_te), (t_tr, t_te) = _balanced_split(source.shape[0], target.shape[0], max_samples, test_fraction, seed)
    dev = source.device
    x_tr = torch.cat([source[s_tr.to(dev)], target[t_tr.to(dev)]])
    x_te = torch.cat([source[s_te.to(dev)], target[t_te.to(dev)]])
    y_tr = torch.cat([torch.zeros(len(s_tr)), torch.ones(len(t_tr))]).to(device=dev, dtype=source.dtype)
    y_te = torch.cat([torch.zeros(len(s_te)), torch.ones(len(t_te))]).to(device=dev, dtype=source.dtype)
    mu, sd = x_tr.mean(0), x_tr.std(0).clamp_min(1e-8)
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    if backend == "torch":
        w, b = _fit_logistic_torch(x_tr, y_tr, C, max_iter)
        pred = (x_te @ w + b > 0).to(y_te.dtype)
        err = float((pred != y_te).to(torch.float64).mean())
    else:
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(C=C, max_iter=max_iter)
        clf.fit(x_tr.cpu().numpy(), y_tr.cpu().numpy())
        err = float(np.mean(clf.predict(x_te.cpu().numpy()) != y_te.cpu().numpy()))
    return 2.0 * (1.0 - 2.0 * err)


# ----------------------------------------------------------------------------- bootstrap and profiles
def get_gap_metric(name: str) -> Callable[..., float]:
    """The registered gap metric ``name`` (unknown names raise with suggestions)."""
    return GAP_METRICS.get(name)


def bootstrap_ci(metric: Union[str, Callable[..., float]], source, target, n_boot: int = 100, alpha: float = 0.05,
                 seed: int = 0, **kwargs) -> Tuple[float, float, float]:
    """Point estimate and bias-corrected percentile bootstrap interval of a gap metric.

    Both sets are resampled with replacement, independently (labels in ``source_labels`` /
    ``target_labels`` follow their rows). Why bias-corrected: resampling duplicates points, which
    shifts set distances (unbiased MMD^2 counts duplicate pairs, a classifier can memorise points
    that land in both splits), so the raw percentile interval need not even contain the estimate.
    The interval is the alpha/2 and 1 - alpha/2 quantiles of the bootstrap values shifted by
    (value - mean of the bootstrap values).

    Args:
        metric: a registered name or a callable ``metric(source, target, **kwargs) -> float``.
        source: ``[m, d]``.
        target: ``[n, d]``.
        n_boot: resamples (0 gives ``(value, value, value)``).
        alpha: 1 - coverage.
        seed: resampling seed.
        **kwargs: passed to the metric.

    Returns:
        ``(value, lo, hi)``.
    """
    fn = get_gap_metric(metric) if isinstance(metric, str) else metric
    if n_boot < 0:
        raise ValueError(f"n_boot={n_boot} must be >= 0")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha} must be in (0, 1)")
    source, target = _pair(source, target)
    for key, feats, name in (("source_labels", source, "source"), ("target_labels", target, "target")):
        if kwargs.get(key) is not None:
            kwargs[key] = check_labels(key, kwargs[key], feats.shape[0], name, feats.device)
    value = float(fn(source, target, **kwargs))
    if n_boot == 0:
        return value, value, value
    gen = torch.Generator().manual_seed(seed)
    boots = []
    for _ in range(n_boot):
        i_s = torch.randint(source.shape[0], (source.shape[0],), generator=gen).to(source.device)
        i_t = torch.randint(target.shape[0], (target.shape[0],), generator=gen).to(target.device)
        kw = dict(kwargs)
        if kw.get("source_labels") is not None:
            kw["source_labels"] = kw["source_labels"][i_s]
        if kw.get("target_labels") is not None:
            kw["target_labels"] = kw["target_labels"][i_t]
        boots.append(float(fn(source[i_s], target[i_t], **kw)))
    boots_t = torch.tensor(boots, dtype=torch.float64)
    shift = value - float(boots_t.mean())
    lo, hi = torch.quantile(boots_t, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)).tolist()
    return value, lo + shift, hi + shift


def gap_profile(source_feats: Mapping[str, Tensor], target_feats: Mapping[str, Tensor],
                metrics: Optional[Sequence[str]] = None, n_boot: int = 0, *, alpha: float = 0.05, seed: int = 0,
                source_labels=None, target_labels=None, metric_kwargs: Optional[Mapping[str, dict]] = None,
                standardize: bool = True, device=None) -> Dict:
    """Every requested gap metric at every layer, as a JSON-serialisable dict.

    Args:
        source_feats: layer name -> ``[m, d_layer]`` source features.
        target_feats: layer name -> ``[n, d_layer]`` target features (same layer names).
        metrics: registered metric names; None = all, leaving out ``otdd`` when labels are missing.
        n_boot: bootstrap resamples per (layer, metric); 0 reports the point estimate only.
        alpha: 1 - coverage of the intervals.
        seed: bootstrap seed.
        source_labels: ``[m]`` labels (needed by ``otdd``).
        target_labels: ``[n]`` labels, e.g. k-means cluster ids (needed by ``otdd``).
        metric_kwargs: per-metric options, e.g. ``{"sinkhorn": {"blur": 0.1}}``.
        standardize: divide both sets of each layer by the source RMS deviation from its mean.
        device: where to compute (None = where the features are).

    Returns:
        ``{"layers": [...], "metrics": [...], "values": {layer: {metric: {"value", "lo", "hi"}}},
        "scale": {layer: float}, "seconds": {metric: float}, "settings": {...}}``.
    """
    missing = sorted(set(source_feats) ^ set(target_feats))
    if missing:
        raise ValueError(f"source_feats and target_feats must have the same layers; unmatched: {missing}")
    if not source_feats:
        raise ValueError("source_feats is empty: no layers to measure")
    have_labels = source_labels is not None and target_labels is not None
    if metrics is None:
        metrics = [m for m in GAP_METRICS.names() if have_labels or m not in LABELLED_METRICS]
    metrics = list(metrics)
    for name in metrics:
        GAP_METRICS.get(name)  # unknown names fail before any work
        if name in LABELLED_METRICS and not have_labels:
            raise ValueError(f"gap metric {name!r} needs source_labels and target_labels")
    metric_kwargs = {k: dict(v) for k, v in (metric_kwargs or {}).items()}
    unknown = sorted(set(metric_kwargs) - set(metrics))
    if unknown:
        raise ValueError(f"metric_kwargs has options for metrics not requested: {unknown}")
    layers = list(source_feats)
    values: Dict[str, Dict[str, Dict[str, float]]] = {}
    scales: Dict[str, float] = {}
    seconds = {name: 0.0 for name in metrics}
    for layer in layers:
        src = check_features(f"source_feats[{layer!r}]", source_feats[layer])
        tgt = check_features(f"target_feats[{layer!r}]", target_feats[layer], src.shape[1],
                             f"source_feats[{layer!r}]")
        dev = device if device is not None else src.device
        src, tgt = src.to(dev).float(), tgt.to(dev).float()
        scale = 1.0
        if standardize:
            scale = float((src - src.mean(0)).pow(2).sum(1).mean().sqrt())
            scale = scale if scale > 0 else 1.0
            src, tgt = src / scale, tgt / scale
        scales[layer] = scale
        values[layer] = {}
        for name in metrics:
            kw = dict(metric_kwargs.get(name, {}))
            if name in LABELLED_METRICS:
                kw.update(source_labels=source_labels, target_labels=target_labels)
            t0 = time.perf_counter()
            value, lo, hi = bootstrap_ci(name, src, tgt, n_boot=n_boot, alpha=alpha, seed=seed, **kw)
            if dev is not None and torch.device(dev).type == "cuda":
                torch.cuda.synchronize(dev)
            seconds[name] += time.perf_counter() - t0
            values[layer][name] = {"value": value, "lo": lo, "hi": hi}
    return {
        "layers": layers,
        "metrics": metrics,
        "values": values,
        "scale": scales,
        "seconds": seconds,
        "settings": {"n_boot": n_boot, "alpha": alpha, "seed": seed, "standardize": standardize,
                     "metric_kwargs": metric_kwargs, "n_source": int(next(iter(source_feats.values())).shape[0]),
                     "n_target": int(next(iter(target_feats.values())).shape[0]),
                     "labelled": have_labels},
    }


__all__ = ["GAP_METRICS", "SOURCE_MULTIPLIERS", "bootstrap_ci", "gap_profile", "get_gap_metric", "mmd", "mmd_saturation",
           "mmd_source", "otdd_gap", "proxy_a_distance", "random_directions", "sinkhorn", "sliced_w2_source",
           "sliced_wasserstein"]
