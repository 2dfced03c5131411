"""The adapter package's registries: methods, LoRA initialisations of A, DyLoRA rank distributions.

Why a module of their own: :class:`orca.adapters.config.AdapterConfig` checks ``adapter.method``,
``adapter.init_a`` and ``adapter.dylora_dist`` against them, and the method modules (which import
the config) fill them. Kept below both, the config reads the registries without importing a method
module, so the package has no import cycle. They are filled by the time any config is built:
importing any ``orca.adapters`` module first runs the package ``__init__``, which imports every
method.
"""
from __future__ import annotations

from datasets.registry import Registry

ADAPTERS = Registry("adapter method")
INIT_SCHEMES = Registry("LoRA init scheme")
RANK_DISTRIBUTIONS = Registry("DyLoRA rank distribution")
