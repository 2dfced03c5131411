"""Stage 2: per-layer modality gaps, their turning into LoRA ranks, and the rank-gap hypothesis test.

    features   forward hooks at the embedder and every Swin block (source and target streams)
    gaps       GAP_METRICS (mmd, sliced_wasserstein, sinkhorn, otdd, pad), bootstrap CIs, gap_profile
    allocate   per-block gaps -> IBP rank posterior P(r | D) -> an exact-budget rank map
    config     RankConfig, the ``rank`` section of the experiment config
    stage      run_stage2 (``python -m orca stage2``): all of the above, written to a run directory

Submodules are imported explicitly by their users (``rank_estimation.allocate``,
``rank_estimation.config``, ...) so that importing the package stays cheap and free of torch.
"""
