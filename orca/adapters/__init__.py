"""Stage-3 fine-tuning methods (full, head, LoRA and its variants) behind one registry.

Every method is registered here, by name, in one place: reading this file tells you the complete
set (``python -c "from orca.adapters import ADAPTERS; print(ADAPTERS.names())"``), and a test checks
it. See ``base.py`` for the contract with the training loop.
"""
from orca.adapters.base import (
    AdapterMethod,
    FullFineTuning,
    HeadOnly,
    build_method,
    count_parameters,
)
from orca.adapters.config import AdapterConfig, TARGET_PRESETS
from orca.adapters.delta_lora import DeltaLoRAMethod
from orca.adapters.dylora import DyLoRAMethod, sweep_ranks
from orca.adapters.lora import (
    LoRALayer,
    LoRALinear,
    LoRAMethod,
    inject_lora,
    lora_layers,
    merge_adapters,
    resolve_ranks,
    unmerge_adapters,
)
from orca.adapters.adalora import AdaLoRAMethod
from orca.adapters.qlora import QLoRAMethod
from orca.adapters.registries import ADAPTERS

ADAPTERS.register("full", FullFineTuning)
ADAPTERS.register("head", HeadOnly)
ADAPTERS.register("lora", LoRAMethod)
ADAPTERS.register("delta_lora", DeltaLoRAMethod)
ADAPTERS.register("dylora", DyLoRAMethod)
ADAPTERS.register("qlora", QLoRAMethod)
ADAPTERS.register("adalora", AdaLoRAMethod)

__all__ = [
    "ADAPTERS", "AdapterConfig", "AdapterMethod", "TARGET_PRESETS", "build_method",
    "count_parameters", "FullFineTuning", "HeadOnly", "LoRAMethod", "DeltaLoRAMethod",
    "DyLoRAMethod", "QLoRAMethod", "LoRALayer", "LoRALinear", "inject_lora", "lora_layers",
    "merge_adapters", "unmerge_adapters", "resolve_ranks", "sweep_ranks",
]
