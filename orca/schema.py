"""Typed dataclass configs from plain dicts, with errors a user can act on.

Why not OmegaConf or tyro: we need exactly three things -- reject an unknown key naming the nearest
valid one, coerce YAML scalars into the annotated types, and let each owner (a task, an adapter
method, a stage) keep its own schema dataclass next to its code. About 150 lines of standard
library do that without another dependency, and the schema stays plain ``@dataclass``es that
``dataclasses.asdict`` serialises.
"""
from __future__ import annotations

import dataclasses
import difflib
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
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path or 'config'}: {err}") from None


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
            return float(value)  # YAML reads "3e-4" as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
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
