"""orca-rank's data package (not Hugging Face ``datasets``): task generators, loaders, registry.

Tasks register themselves in :mod:`datasets.registry` through the explicit imports below.
"""
from datasets.registry import TASKS, TaskData, build_task, get_task, register_task  # noqa: F401
from datasets import darcy  # noqa: F401
from datasets import fractal, fractal_dial, images, tones  # noqa: F401
