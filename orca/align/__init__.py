"""Stage 1: align a target embedder's features to the source feature distribution.

Objectives (``otdd``, ``mmd``, ``l2``) live in the ``alignment objective`` registry, filled by the
explicit import below; OTDD and MMD themselves are importable for stage 2's gap metrics.
"""
from orca.align.objectives import OBJECTIVES, AlignmentObjective, build_objective  # noqa: F401
# `otdd` (the function) is not re-exported: it would shadow the submodule `orca.align.otdd`.
from orca.align.otdd import OTDD  # noqa: F401
