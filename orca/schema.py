"""Typed dataclass configs from plain dicts, with errors a user can act on.

Why not OmegaConf or tyro: we need exactly three things -- reject an unknown key naming the nearest
valid one, coerce YAML scalars into the annotated types, and let each owner (a task, an adapter
method, a stage) keep its own schema dataclass next to its code. About 200 lines of standard
library do that without another dependency, and the schema stays plain ``@dataclass``es that
``dataclasses.asdict`` serialises.

Numbers that cannot be meant are refused in one place, not by ``if``s in every section: a ``float``
field never takes nan or inf, and a field's metadata may bound it -- ``min`` / ``max`` (inclusive),
``gt`` / ``lt`` (exclusive), applied to each element of a list or tuple; ``path_component`` requires
a single file-name component (no ``/``, not ``..``). :func:`from_dict` checks them on every section
it builds, so the owners of task options (``datasets``, which imports nothing of ours) bound their
fields with a plain metadata dict too.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Type, TypeVar, Union

from orca.errors import UsageError

T = TypeVar("T")


class ConfigError(UsageError, ValueError):
    """A config value or key is invalid; the message names the dotted key."""


def nearest(name: str, valid: Sequence[str]) -> str:
    """A ``'; did you mean X?'`` suffix for ``name`` among ``valid`` (empty when nothing is close)."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def from_dict(cls: Type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, recursing into nested dataclass fields.

    Args:
        cls: the schema dataclass.
        data: mapping of field name -> value (YAML-loaded); missing fields keep their defaults.
        path: dotted prefix of this section, used in error messages (``"train"``).

    Raises:
        ConfigError: on an unknown key (naming the nearest valid key) or a value that cannot be
            coerced to the field's type.
    """
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {type(data).__name__} {data!r}")
    upgrade = getattr(cls, "upgrade", None)
    if upgrade is not None:  # a schema whose keys moved reads configs written before (orca.config.MOVED_KEYS)
        data = upgrade(data)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key {dotted!r}{nearest(str(key), list(fields))} "
                              f"(valid keys under {path or 'the top level'}: {', '.join(sorted(fields))})")
        kwargs[key] = coerce(value, hints[key], dotted)
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path or 'config'}: {err}") from None
    check_bounds(obj, path)
    return obj


_BOUNDS = {"min": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
           "max": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def check_bounds(obj: Any, path: str = "") -> None:
    """Raise ConfigError for a field of dataclass ``obj`` outside its metadata bounds (see module doc).

    None (an unset Optional) is always allowed; bounds apply to each element of a list or tuple.
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        dotted = f"{path}.{f.name}" if path else f.name
        if f.metadata.get("path_component") and value is not None:
            text = str(value)
            if not text or text in (".", "..") or any(c in text for c in "/\\\0"):
                raise ConfigError(f"{value!r} is not a plain name", dotted,
                                  "give one path component: letters, digits, - _ . (no / and not ..)")
        bounds = [(key, f.metadata[key]) for key in _BOUNDS if key in f.metadata]
        if not bounds or value is None:
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            if not all(_BOUNDS[key][1](item, bound) for key, bound in bounds):
                allowed = " and ".join(f"{_BOUNDS[key][0]} {bound}" for key, bound in bounds)
                raise ConfigError(f"{value!r} is out of range", dotted, f"give a value {allowed}")


def coerce(value: Any, tp: Any, path: str) -> Any:
    """Coerce a YAML value to annotation ``tp`` (dataclass, Optional, Union, list, tuple, dict, scalar)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        if len([a for a in args if a is not type(None)]) == 1:  # Optional[X]: X's own message
            return coerce(value, next(a for a in args if a is not type(None)), path)
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{path}: {value!r} matches none of {tp}: {'; '.join(errors)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, args))}{nearest(str(value), [str(a) for a in args])}")
        return value
    if origin in (list, List, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [coerce(v, args[0] if args else Any, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {value!r}")
        if args and args[-1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args or [Any] * len(value))))
    if origin in (dict, Dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            number = float(value)  # YAML reads "3e-4" as a string
        except (TypeError, ValueError, OverflowError):  # OverflowError: an integer beyond float range
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{value!r} is not a finite number", path, "give a finite number (no nan or inf)")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def to_dict(obj: Any) -> Any:
    """Plain-data view of a (nested) dataclass config: dicts, lists and scalars only."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raise ConfigError unless ``value`` is in ``allowed`` (message names field, value, choices)."""
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}"
                          f"{nearest(str(value), [str(a) for a in allowed])}")


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    """Raise ConfigError unless ``value`` > 0 (or >= 0 with ``allow_zero``)."""
    if value is None or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")
