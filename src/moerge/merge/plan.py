"""A merge plan: experts, method, weights and parameters, answering per module.

Both output writers (adapter, full) ask the plan for one module at a time, so at most one
module's expert updates are in memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

from moerge.errors import MoergeError
from moerge.merge.experts import LoraExpert, union_modules
from moerge.merge.methods import MergeMethod, MergeParams, post_scale

_LAYER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class MergePlan:
    experts: list[LoraExpert]
    method: MergeMethod
    weights: torch.Tensor
    params: MergeParams

    def __post_init__(self) -> None:
        if len(self.weights) != len(self.experts):
            raise MoergeError(f"weights: {len(self.weights)} weights for {len(self.experts)} experts")
        if self.method.experts is not None and len(self.experts) != self.method.experts:
            raise MoergeError(
                f"method: {self.method.name} merges exactly {self.method.experts} experts, got {len(self.experts)}"
            )

    @cached_property
    def modules(self) -> list[str]:
        return union_modules(self.experts)

    @cached_property
    def n_layers(self) -> int:
        """Depth L for LiNeS: one more than the largest layer index among the merged modules."""
        indices = [layer_index(m) for m in self.modules]
        return max((i for i in indices if i is not None), default=0) + 1

    def params_for(self, module: str) -> MergeParams:
        """The run's parameters with this module's depth and its own reproducible random stream."""
        index = layer_index(module)
        fraction = 1.0 if index is None or self.n_layers == 1 else index / (self.n_layers - 1)
        seed = (self.params.seed * 1_000_003 + zlib.crc32(module.encode())) % 2**63
        return dataclasses.replace(self.params, layer_fraction=fraction, seed=seed)

    def task_vectors(self, module: str) -> torch.Tensor:
        """(experts, out, in): each expert's Δ of `module`, zero for an expert without it."""
        shape = next(e.shape(module) for e in self.experts if module in e.modules)
        stacked = torch.zeros(len(self.experts), *shape)
        for k, expert in enumerate(self.experts):
            pair = expert.factors(module)
            if pair is not None:
                torch.matmul(pair[1], pair[0], out=stacked[k])
        return stacked

    def delta(self, module: str) -> torch.Tensor:
        """The merged update of `module` (adapter layout)."""
        params = self.params_for(module)
        return self.method.fn(self.task_vectors(module), self.weights, params) * post_scale(params)

    def coefficients(self, module: str) -> torch.Tensor:
        """Linear methods only: c_k with merged Δ = Σ c_k·Δ_k for this module."""
        if self.method.coefficients is None:
            raise MoergeError(f"method: {self.method.name} is not a linear combination")
        params = self.params_for(module)
        return self.method.coefficients(self.weights, params) * post_scale(params)


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS after each module.

    glibc keeps the many large, differently sized temporaries of a merge in fragmented arenas, so
    without this the resident size creeps up module after module (no-op off glibc).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()


def layer_index(module: str) -> int | None:
    """The transformer block a module sits in (first number in its dotted name), if any."""
    match = _LAYER.search(f".{module}.")
    return int(match[1]) if match else None
