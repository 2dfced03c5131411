"""Name -> object registries shared by every pluggable family (tasks, adapters, gap metrics, ...).

Why one class: every family needs the same three things -- refuse duplicate names (a silent
overwrite hides a plugin), list names with shell-style patterns, and fail on an unknown name with
a message that suggests the nearest valid one. Families are filled by explicit imports in their
package ``__init__`` (never by star-import side effects), and a test checks the expected names.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable, Dict, Iterator, List, Optional


class Registry:
    """A named mapping from lowercase names to objects (usually classes or factories).

    Args:
        kind: what the entries are, used in error messages ("task", "adapter method", ...).
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Any] = {}

    def register(self, name: Optional[str] = None, obj: Any = None) -> Callable:
        """Register ``obj`` under ``name``; usable as ``@registry.register("name")``."""

        def _add(target: Any) -> Any:
            key = name if name is not None else getattr(target, "__name__", None)
            if not isinstance(key, str) or not key:
                raise ValueError(f"{self.kind} registry: a name is required for {target!r}")
            if key != key.lower():
                raise ValueError(f"{self.kind} registry: name {key!r} must be lowercase")
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is already registered ({self._entries[key]!r})")
            self._entries[key] = target
            return target

        return _add(obj) if obj is not None else _add

    def get(self, name: str) -> Any:
        """Return the entry for ``name``; unknown names raise with the closest valid names."""
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), list(self._entries), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} (registered: {', '.join(sorted(self._entries))})"

    def names(self, pattern: str = "*") -> List[str]:
        """Sorted registered names matching the fnmatch ``pattern``."""
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
