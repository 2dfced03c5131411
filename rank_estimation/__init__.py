"""Stage 2: per-layer modality gaps, their turning into LoRA ranks, and the rank-gap hypothesis test.

Submodules are imported explicitly by their users (``rank_estimation.allocate``,
``rank_estimation.config``, ...) so that importing the package stays cheap and free of torch.
"""
