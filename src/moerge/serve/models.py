"""What a server serves: `base`, every expert of the library (looked up when asked, so an expert added
while the server runs is servable), the router folders it was given, and `auto` (the default router).

Models load through the strategy registry (`moerge.recipes.strategies`), like `eval` and `compare`,
and are kept in a small LRU cache: an expert is folded into its own copy of the base weights, so the
cache bounds memory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moerge.recipes.strategies import Loaded, StrategySpec, Workspace, load_strategy
from moerge.serve.schemas import ServeError

AUTO = "auto"
BASE = "base"


@dataclass
class ModelPool:
    """Model name → loaded strategy. `routers` maps a served router name to its folder."""

    base: str
    library: Any = None
    routers: dict[str, Path] = field(default_factory=dict)
    auto: str | None = None
    max_loaded: int = 4
    max_memory_gb: float | None = None
    _loaded: OrderedDict[str, Loaded] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def names(self) -> list[str]:
        """Every servable model name: base, auto (when a router is served), routers, library experts."""
        experts = self.library.names() if self.library is not None else []
        return [BASE, *([AUTO] if self.auto else []), *self.routers, *experts]

    def resolve(self, name: str) -> str:
        """The served name a request's `model` stands for (`auto` → its router); 404 when unknown."""
        if name == AUTO and self.auto:
            return self.auto
        if name == BASE or name in self.routers:
            return name
        if self.library is not None and name in self.library.names():
            return name
        raise ServeError(
            404, f"model {name!r} does not exist; GET /v1/models lists them", kind="not_found_error", param="model"
        )

    def spec(self, name: str) -> StrategySpec:
        if name == BASE:
            return StrategySpec.model_validate({"kind": "base"})
        if name in self.routers:
            return StrategySpec.model_validate({"name": name, "kind": "router", "path": str(self.routers[name])})
        return StrategySpec.model_validate({"name": name, "kind": "expert", "path": str(self.library.path(name))})

    def get(self, name: str) -> Loaded:
        """The loaded model for a resolved name, loading it (and evicting the least recently used) when
        needed. Callers hold the engine's single worker, so loads never race a generation."""
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
        loaded = load_strategy(self.spec(name), Workspace(base=self.base, library=self.library))
        self._check_fits(name, loaded)
        with self._lock:
            self._loaded[name] = loaded
            while len(self._loaded) > self.max_loaded or self._over_budget():
                self._loaded.popitem(last=False)
        return loaded

    def _check_fits(self, name: str, loaded: Loaded) -> None:
        """A model bigger than the whole memory budget (a full-weight expert on a small budget) is not
        kept: the request gets a 503 saying so, and the models already loaded stay."""
        if self.max_memory_gb is not None and model_gb(loaded.model) > self.max_memory_gb:
            raise ServeError(
                503,
                f"model {name!r} needs {model_gb(loaded.model):.2f} GB, more than the server's memory budget "
                f"(--max-memory-gb {self.max_memory_gb:g})",
                kind="server_error",
            )

    def _over_budget(self) -> bool:
        """More than one model loaded and together above the budget: the least recently used goes."""
        if self.max_memory_gb is None or len(self._loaded) <= 1:
            return False
        return sum(model_gb(loaded.model) for loaded in self._loaded.values()) > self.max_memory_gb

    def loaded_names(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def describe(self, name: str) -> dict[str, Any]:
        """What `GET /v1/models` says about a model (OpenAI's fields plus moerge's)."""
        kind = "base" if name == BASE else "router" if name in self.routers or name == AUTO else "expert"
        info: dict[str, Any] = {"id": name, "object": "model", "created": 0, "owned_by": "moerge", "kind": kind}
        if name == AUTO:
            info["routes_with"] = self.auto
        elif kind == "expert":
            meta = self.library.meta(name)
            info.update(task=meta.task.name, method=meta.method)
        return info


def model_gb(model: Any) -> float:
    """Memory a loaded model holds: its parameters and buffers (a merged or full expert carries its own
    copy of the base weights)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30
