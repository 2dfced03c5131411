"""The experiment config: one schema for every stage, loaded as defaults < YAML < CLI overrides.

Why one schema: stage 1, 2 and 3 of one experiment read the same task, body and seed, and the run
directory of each stage stores the fully resolved config, so any run can be repeated from its
``config.yaml`` alone. Sections owned by a sub-package (adapters, alignment, a task's options) keep
their dataclass next to their code; this module only composes them.

Why the schema is composed in layers: :class:`ExperimentConfig` holds the sections of orca's own
stages (0, 1 and 3). Stage 2 lives above orca core (``rank_estimation`` builds on it), so its
``rank`` section is a subclass there (``rank_estimation.config.Stage2Config``) and orca core never
imports it. The entry points (``orca.cli``, the scripts) load the most derived schema, which holds
every section; :func:`load_config` takes the schema to load as an argument.

YAML files may start with ``base: other.yaml`` (resolved relative to the file) and then list only
the keys that differ, so an experiment file reads as its difference from the default.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

import yaml

from datasets.registry import get_task
from orca.adapters.config import AdapterConfig
from orca.adapters.optim import OPTIMIZERS
from orca.align.config import AlignConfig
from orca.bodies import ATTENTION_KINDS
from orca.checkpointing import normalize as normalize_checkpointing
from orca.runtime import AMP_MODES
from orca.schema import ConfigError, check_choice, from_dict, to_dict


@dataclass
class TaskConfig:
    """Which registered task to run and its task-specific options (validated by the task's schema)."""

    name: str = field(default="darcy", metadata={"help": "registered task name (python -m orca list tasks)"})
    data_root: str = field(default="data", metadata={"help": "root directory for generated caches and downloaded files"})
    options: Any = field(default_factory=dict, metadata={"help": "options of the task, checked against its schema"})

    def __post_init__(self):
        try:
            entry = get_task(self.name)
        except KeyError as err:
            raise ConfigError(f"task.name: {err.args[0]}") from None
        if not isinstance(self.options, entry.options):
            self.options = from_dict(entry.options, self.options or {}, "task.options")


@dataclass
class ModelConfig:
    """The ORCA model: target embedder -> pretrained timm Swin body -> task head."""

    body: str = field(default="swin_base_patch4_window7_224", metadata={"help": "timm model name of the Swin body"})
    weights: str = field(default="hub", metadata={"help": "hub | file | none: where the body's weights come from"})
    hub_tag: str = field(default="ms_in22k", metadata={"help": "timm pretrained tag used with weights=hub"})
    weights_file: Optional[str] = field(default=None, metadata={"help": "checkpoint path used with weights=file (.safetensors/.pth/.bin)"})
    body_kwargs: Dict[str, Any] = field(default_factory=dict, metadata={"help": "extra timm kwargs (embed_dim, depths, num_heads, window_size) for reduced Swins"})
    img_size: int = field(default=224, metadata={"min": 1, "help": "input resolution the body runs at; target inputs are resized to it"})
    attention: str = field(default="auto", metadata={"help": "auto (sdpa where the body has timm's switch: Swin V1) | sdpa (F.scaled_dot_product_attention, bias and shift mask as its mask) | bmm (timm's default: explicit q k^T, softmax, . v): the same function, other kernels; sdpa is faster and smaller on GPU (results/bench/train_eager_sdpa.md)"})
    embedder_init: str = field(default="pretrained", metadata={"help": "pretrained (ORCA: tile the RGB patch embedding over C_in) | random"})
    embedder_from: Optional[str] = field(default=None, metadata={"help": "stage-1 run directory whose aligned embedder replaces the initial one"})
    warmup_from: Optional[str] = field(default=None, metadata={"help": "stage 3: a head-only warm-up run (or a directory of them: the one with this task and seed) whose embedder and head are loaded; freeze them with adapter.train_embedder=false adapter.train_head=false (orca/warmup.py)"})
    decoder_channels: int = field(default=3, metadata={"min": 1, "help": "channels of the SimMIM-style dense decoder before the channel mean"})

    def __post_init__(self):
        check_choice("model.weights", self.weights, ("hub", "file", "none"))
        check_choice("model.embedder_init", self.embedder_init, ("pretrained", "random"))
        check_choice("model.attention", self.attention, ATTENTION_KINDS)
        if self.weights == "file" and not self.weights_file:
            raise ConfigError("model.weights=file needs model.weights_file=PATH")


@dataclass
class TrainConfig:
    """Optimisation of the training stages, 3 and 0 (defaults: ORCA's Darcy recipe for stage 3)."""

    optimizer: str = field(default="adamw", metadata={"help": "adamw | sgd | paged_adamw (bitsandbytes' paged AdamW, CUDA only: QLoRA's optimizer)"})
    lr: float = field(default=1e-3, metadata={"gt": 0, "help": "peak learning rate"})
    betas: Tuple[float, float] = field(default=(0.9, 0.98), metadata={"min": 0, "lt": 1, "help": "AdamW betas"})
    momentum: float = field(default=0.9, metadata={"min": 0, "help": "SGD momentum"})
    weight_decay: float = field(default=5e-3, metadata={"min": 0, "help": "decoupled weight decay (not on biases and norms)"})
    epochs: int = field(default=100, metadata={"min": 1, "help": "training epochs"})
    warmup_epochs: float = field(default=5, metadata={"min": 0, "help": "linear warm-up length; then linear decay to 0 (ORCA)"})
    batch_size: int = field(default=4, metadata={"min": 1, "help": "global batch size per optimizer micro-step"})
    grad_accum: int = field(default=1, metadata={"min": 1, "help": "micro-batches per optimizer step"})
    clip_grad: Optional[float] = field(default=None, metadata={"gt": 0, "help": "max global grad norm (None = no clipping)"})
    amp: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA, off on CPU) | bf16 | off"})
    eval_every: int = field(default=1, metadata={"min": 1, "help": "validate every N epochs (the last epoch always validates)"})
    num_workers: int = field(default=0, metadata={"min": 0, "help": "DataLoader workers"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    deterministic: bool = field(default=False, metadata={"help": "deterministic algorithms (bitwise-reproducible resume on CPU)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the training forward (GPU) for full batches; an epoch's last, smaller batch runs eagerly, so shapes stay static and the data are those of an eager run"})
    compile_mode: str = field(default="default", metadata={"help": "torch.compile mode: default | reduce-overhead (CUDA graphs: small batches, launch-bound) | max-autotune | max-autotune-no-cudagraphs"})
    compile_backend: str = field(default="inductor", metadata={"help": "torch.compile backend: inductor (fused kernels; minutes to compile a Swin training step) | cudagraphs (the eager kernels recorded as CUDA graphs: seconds to capture, no fusion; for launch-bound steps such as packed sweeps; compile_mode stays default)"})
    grad_checkpointing: Optional[List[Union[int, str]]] = field(default=None, metadata={"help": "blocks that recompute activations in backward (memory for compute; None = off): each entry a 0-based body stage S (all its blocks) or a quoted string \"S:K\" (its first K >= 1 blocks), e.g. [0, 1, \"2:6\"]; unquoted 2:6 is base-60 126 in YAML"})
    channels_last: bool = field(default=False, metadata={"help": "channels-last memory format for the conv embedder (GPU)"})
    max_steps_per_epoch: Optional[int] = field(default=None, metadata={"min": 1, "help": "truncate epochs (debugging, smoke tests)"})
    log_every: int = field(default=50, metadata={"min": 1, "help": "write training scalars every N optimizer steps"})
    save_every_steps: Optional[int] = field(default=None, metadata={"min": 1, "help": "also checkpoint every N optimizer steps mid-epoch (resume granularity)"})

    def __post_init__(self):
        check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        check_choice("train.amp", self.amp, AMP_MODES)
        check_choice("train.compile_mode", self.compile_mode,
                     ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
        check_choice("train.compile_backend", self.compile_backend, ("inductor", "cudagraphs"))
        if self.compile_backend == "cudagraphs" and self.compile_mode != "default":
            raise ConfigError(f"train.compile_mode={self.compile_mode} is an inductor mode; with "
                              "train.compile_backend=cudagraphs leave it at default")
        # syntax and distinct stages here; stage count and depths when the body exists (orca.checkpointing)
        self.grad_checkpointing = normalize_checkpointing(self.grad_checkpointing, "train.grad_checkpointing")
        # ranges (lr > 0, counts >= 1, ...) are in each field's metadata, checked by orca.schema
        if self.warmup_epochs >= self.epochs and self.epochs > 1:
            raise ConfigError(f"train.warmup_epochs={self.warmup_epochs} must be < train.epochs={self.epochs}")


@dataclass
class PretrainConfig:
    """What only stage 0 (pretraining a body, ``orca.pretrain``) reads; its optimisation is ``train``'s."""

    time_budget_s: Optional[float] = field(default=None, metadata={"gt": 0, "help": "stop after this many seconds, rendering and compilation included (None = epochs only)"})
    label_smoothing: float = field(default=0.0, metadata={"min": 0, "lt": 1, "help": "label smoothing of the cross entropy"})
    mim_weight: float = field(default=0.0, metadata={"min": 0, "help": "weight of SimMIM's masked-pixel L1 loss added to the cross entropy (0 = classification only; orca/masked_pretraining.py)"})
    mim_mask_ratio: float = field(default=0.6, metadata={"gt": 0, "lt": 1, "help": "with mim_weight > 0: fraction of mask blocks replaced by the mask token (SimMIM: 0.6)"})
    mim_mask_patch: int = field(default=32, metadata={"min": 1, "help": "with mim_weight > 0: side of a mask block in pixels, a multiple of the patch size (SimMIM on Swin: 32)"})


#: Keys that moved to another section: old dotted name -> new one. A run directory keeps the
#: resolved config it started with (every key written out), so configs written before a move must
#: still load: :meth:`ExperimentConfig.upgrade` moves each value to its new place.
MOVED_KEYS: Dict[str, str] = {f"train.{key}": f"pretrain.{key}" for key in
                              ("time_budget_s", "label_smoothing", "mim_weight", "mim_mask_ratio", "mim_mask_patch")}


def _upgrade(data: Mapping[str, Any]) -> Dict[str, Any]:
    """``data`` with the keys of :data:`MOVED_KEYS` moved, and ``adapter.paged_adamw`` (a second switch
    for what ``train.optimizer=paged_adamw`` says) folded into ``train.optimizer``.

    Raises:
        ConfigError: an old key and its new one both given with different values, or
            ``adapter.paged_adamw=true`` beside an optimizer other than AdamW.
    """
    data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for old, new in MOVED_KEYS.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        if not isinstance(data.get(old_section), dict) or old_key not in data[old_section]:
            continue
        value = data[old_section].pop(old_key)
        target = data.setdefault(new_section, {})
        if not isinstance(target, dict):
            continue  # from_dict reports the malformed section
        if new_key in target and target[new_key] != value:
            raise ConfigError(f"{old} has moved to {new}, and this config gives both ({value!r} and "
                              f"{target[new_key]!r}): keep {new} only")
        target.setdefault(new_key, value)
    adapter = data.get("adapter")
    if isinstance(adapter, dict) and "paged_adamw" in adapter:
        paged = adapter.pop("paged_adamw")
        if paged not in (True, False, None):
            raise ConfigError(f"adapter.paged_adamw={paged!r}: paged AdamW is now train.optimizer=paged_adamw; "
                              f"remove adapter.paged_adamw")
        if paged:
            train = data.setdefault("train", {})
            optimizer = train.get("optimizer", "adamw") if isinstance(train, dict) else "adamw"
            if optimizer not in ("adamw", "paged_adamw"):
                raise ConfigError(f"adapter.paged_adamw=true asks for paged AdamW but train.optimizer={optimizer!r}: "
                                  f"paged AdamW is now train.optimizer=paged_adamw alone; remove adapter.paged_adamw")
            if isinstance(train, dict):
                train["optimizer"] = "paged_adamw"
    return data


@dataclass
class ExperimentConfig:
    """Everything one run of stage 0, 1 or 3 needs (stage 2 adds ``rank``: module docstring)."""

    name: str = field(default="default", metadata={"path_component": True, "help": "experiment name, part of the run directory"})
    seed: int = field(default=0, metadata={"min": 0, "help": "global seed (data order, init, sampling)"})
    output_dir: str = field(default="runs", metadata={"help": "root under which run directories are created"})
    run_dir: Optional[str] = field(default=None, metadata={"help": "explicit run directory (resume into it if it holds a checkpoint)"})
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    @classmethod
    def upgrade(cls, data: Mapping[str, Any]) -> Dict[str, Any]:
        """Raw config data in today's keys (:data:`MOVED_KEYS`); :func:`orca.schema.from_dict` calls it first."""
        return _upgrade(data)


#: The schema a loader builds: :class:`ExperimentConfig` or a subclass that adds sections.
Schema = TypeVar("Schema", bound=ExperimentConfig)


def parse_override(text: str) -> Tuple[List[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 3e-4); the value is parsed as YAML.

    Raises:
        ConfigError: no ``=``, an empty key part, or a value that is not valid YAML (naming the key).
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} has no '='", "the command line", "write section.key=value (e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key", "the command line", "write section.key=value (e.g. train.lr=3e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""  # "3e-4" stays a str; float fields coerce it
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as err:  # see _yaml_problem
        raise ConfigError(f"the value {raw!r} is not valid YAML ({_yaml_problem(err)})", key,
                          "quote the value or close its brackets (e.g. train.betas=[0.9,0.98])") from None
    return key.split("."), value


def _yaml_problem(err: Exception) -> str:
    """PyYAML's complaint without its multi-line excerpt: 'expected ..., line 3 column 5'.

    Besides ``YAMLError``, PyYAML's constructors raise ``ValueError`` / ``OverflowError`` for a
    tag they cannot build (``!!float x``, ``!!timestamp 2026-99-99``), and its recursive composer
    ``RecursionError`` for brackets nested thousands deep.
    """
    if isinstance(err, RecursionError):
        return "nested too deeply"
    if isinstance(err, UnicodeDecodeError):
        return "not UTF-8 text"
    if not isinstance(err, yaml.YAMLError):
        return f"{type(err).__name__}: {str(err)[:80]}"
    problem = getattr(err, "problem", None) or (str(err).splitlines() or [type(err).__name__])[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem}, line {mark.line + 1} column {mark.column + 1}" if mark else str(problem)


def read_yaml(path: str | os.PathLike, _seen: Optional[set] = None) -> Dict[str, Any]:
    """Load a YAML config, following ``base:`` links (relative to the file) and merging on top.

    An empty file (or one holding only comments) is an error rather than "all defaults": a config
    that says nothing is far more often a truncated or wrong file than a wish for the defaults,
    which ``python -m orca stage3`` without ``--config`` already gives.

    Raises:
        ConfigError: the file is missing, empty, not UTF-8, not valid YAML, not a mapping, or its
            ``base:`` chain is circular; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found", str(path), "configs live in configs/ (see README)")
    seen = _seen or set()
    if path.resolve() in seen:
        raise ConfigError("circular 'base:' chain", str(path), "make the chain end in a file without base:")
    seen.add(path.resolve())
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise ConfigError(f"config is not valid YAML ({_yaml_problem(err)})", str(path), "fix the file (configs/*.yaml show the format)") from None
    if data is None:
        raise ConfigError("config file is empty", str(path), "write at least one key, or leave --config out for the defaults")
    if not isinstance(data, dict):
        raise ConfigError(f"config's top level must be a mapping of keys, got {type(data).__name__}", str(path),
                          "write section: / key: value lines (configs/*.yaml show the format)")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"'base:' must name another YAML file, got {base!r}", str(path), "write base: other.yaml")
    merged = read_yaml(path.parent / base, seen)
    deep_update(merged, data)
    return merged


def deep_update(dst: Dict[str, Any], src: Dict[str, Any]) -> Dict[str, Any]:
    """Recursively merge ``src`` into ``dst`` (mappings merge, everything else replaces)."""
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            deep_update(dst[key], value)
        else:
            dst[key] = copy.deepcopy(value)
    return dst


def load_config(path: Optional[str] = None, overrides: Sequence[str] = (),
                schema: Type[Schema] = ExperimentConfig) -> Schema:
    """Defaults < YAML at ``path`` (with its ``base:`` chain) < dotted ``overrides``; then validate.

    Args:
        schema: the config class to build; the entry points pass the one with every stage's
            sections (``orca.cli.CONFIG_SCHEMA``).

    Raises:
        ConfigError: unknown or misspelt key (naming the nearest valid one), bad value, a missing,
            empty or malformed file.
    """
    data: Dict[str, Any] = read_yaml(path) if path else {}
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for depth, part in enumerate(keys[:-1]):
            if node.get(part) is None:  # absent, or an empty "section:" in the YAML
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"override {text!r} sets a key inside a value that is not a section",
                                  ".".join(keys[:depth + 1]), "set that key itself or drop the override")
            node = node[part]
        node[keys[-1]] = value
    if isinstance(data.get("task"), dict) and "name" in data["task"] and "options" not in data["task"]:
        data["task"]["options"] = {}
    return from_dict(schema, data)


def config_yaml(cfg: ExperimentConfig) -> str:
    """The fully resolved config as YAML text (what ``config.yaml`` holds)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: ExperimentConfig, path: str | os.PathLike) -> None:
    """Write the fully resolved config as YAML (the run directory's ``config.yaml``)."""
    Path(path).write_text(config_yaml(cfg))


def config_dict(cfg: ExperimentConfig) -> Dict[str, Any]:
    """The resolved config as plain data (for summaries and TensorBoard)."""
    return to_dict(cfg)
