"""One registry type for every "name → implementation" table (task sources, training methods, merge
methods, routers, selection policies, strategies): a second registration under a name is refused, and
an unknown name is one line that lists the known ones (with a close match when there is one)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from moerge.errors import MoergeError

T = TypeVar("T")


class Registry(Generic[T]):
    """`kind` names the entries in messages ("merge method", "router", ...). `load`, when given, imports
    the modules whose decorators fill the registry, on first lookup."""

    def __init__(self, kind: str, load: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._load = load

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def get(self, name: str, *, field: str | None = None) -> T:
        """The entry; an unknown name is a MoergeError starting with `field` (e.g. "method") when given."""
        self._ensure_loaded()
        if name not in self:
            close = difflib.get_close_matches(str(name), list(self._entries), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            where = f"{field}: " if field else ""
            raise MoergeError(f"{where}unknown {self.kind} {name!r}; {hint}known: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        self._ensure_loaded()
        yield from sorted(self._entries.items())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return isinstance(name, str) and name in self._entries

    def _ensure_loaded(self) -> None:
        if self._load is not None:
            load, self._load = self._load, None
            load()
