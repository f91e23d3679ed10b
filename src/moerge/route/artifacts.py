"""Per-expert router artifacts (Arrow prototypes, Phatgoose gates) cached in the expert library.

Without a library they are simply computed; with one, `ExpertLibrary.load_artifact/save_artifact`
keep them beside the expert, keyed by how they were computed, so a stale one is never reused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from moerge.route.router import RouterEnv

Tensors = dict[str, torch.Tensor]


def cached_per_expert(
    env: RouterEnv, kind: str, key: dict[str, Any], compute: Callable[[int], Tensors]
) -> list[Tensors]:
    """For each expert k: its artifact from the library if present and current, else `compute(k)`."""
    out = []
    for k, name in enumerate(env.handle.expert_names):
        cached = _load(env.library, name, kind, key)
        if cached is None:
            cached = compute(k)
            _save(env.library, name, kind, key, cached)
        out.append(cached)
    return out


def _in_library(library: Any, name: str) -> bool:
    return library is not None and name in library.names()


def _load(library: Any, name: str, kind: str, key: dict[str, Any]) -> Tensors | None:
    return library.load_artifact(name, kind, key) if _in_library(library, name) else None


def _save(library: Any, name: str, kind: str, key: dict[str, Any], tensors: Tensors) -> None:
    if _in_library(library, name):
        library.save_artifact(name, kind, key, tensors)
