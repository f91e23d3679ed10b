"""A merge plan: experts, method, weights and options, answering per module.

Both output writers (adapter, full) ask the plan for one module at a time, so at most one
module's expert updates are in memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from moerge.errors import MoergeError
from moerge.library.adapter import LoraAdapter, check_same_base, check_same_shapes
from moerge.merge.methods import MergeMethod, MergeOptions, SeededOptions, post_scale

_LAYER = re.compile(r"\.(\d+)\.")


def open_experts(folders: dict[str, Path]) -> list[LoraAdapter]:
    """Open every expert (label → folder) for merging; refuse a mix of base models or layouts."""
    if not folders:
        raise MoergeError("experts: no experts given")
    experts = [
        LoraAdapter.open(folder, label=label).require_plain("merging", allow={"fan_in_fan_out"})
        for label, folder in folders.items()
    ]
    check_same_base(experts)
    check_same_shapes(experts)
    if len({e.config.fan_in_fan_out for e in experts}) > 1:
        raise MoergeError("experts: mix of fan_in_fan_out and regular layouts (different base models)")
    return experts


@dataclass(frozen=True)
class MergePlan:
    experts: list[LoraAdapter]
    method: MergeMethod
    weights: torch.Tensor
    options: MergeOptions

    def __post_init__(self) -> None:
        if len(self.weights) != len(self.experts):
            raise MoergeError(f"weights: {len(self.weights)} weights for {len(self.experts)} experts")
        if self.method.experts is not None and len(self.experts) != self.method.experts:
            raise MoergeError(
                f"method: {self.method.name} merges exactly {self.method.experts} experts, got {len(self.experts)}"
            )

    @cached_property
    def modules(self) -> list[str]:
        """Every module any expert adapts, in network order."""
        return sorted({m for e in self.experts for m in e.modules}, key=_natural_key)

    @property
    def fan_in_fan_out(self) -> bool:
        """The experts' layers store their weight as (in, out) (GPT-2's Conv1D): Δ is applied transposed."""
        return self.experts[0].config.fan_in_fan_out

    @cached_property
    def n_layers(self) -> int:
        """Depth L for LiNeS: one more than the largest layer index among the merged modules."""
        indices = [layer_index(m) for m in self.modules]
        return max((i for i in indices if i is not None), default=0) + 1

    def layer_fraction(self, module: str) -> float:
        """The module's depth (ℓ−1)/(L−1) for LiNeS (1 outside the numbered blocks)."""
        index = layer_index(module)
        return 1.0 if index is None or self.n_layers == 1 else index / (self.n_layers - 1)

    def options_for(self, module: str) -> MergeOptions:
        """The run's options; a random method's seed replaced by this module's own reproducible stream."""
        if not isinstance(self.options, SeededOptions):
            return self.options
        seed = (self.options.seed * 1_000_003 + zlib.crc32(module.encode())) % 2**63
        return self.options.model_copy(update={"seed": seed})

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
        """The merged update of `module` (adapter layout); from the LoRA factors where the method can."""
        if self.method.factored is not None:
            a, b = self.merged_factors(module)
            return b @ a
        merged = self.method.fn(self.task_vectors(module), self.weights, self.options_for(module))
        return merged * post_scale(self.options, self.layer_fraction(module))

    def merged_factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the merged update from the experts' factors (methods with a `factored` form), scaled."""
        experts = [e.factors(module) for e in self.experts]
        a, b = self.method.factored(experts, self.weights, self.options_for(module))
        return a * post_scale(self.options, self.layer_fraction(module)), b

    @staticmethod
    def factors_nonzero(a: torch.Tensor, b: torch.Tensor) -> bool:
        """Whether B·A is not (numerically) zero, without forming it: ‖BA‖² = Σ (AAᵀ ∘ BᵀB), in float64,
        against the bound ‖A‖²·‖B‖² (exact factors of experts that cancel out have non-zero blocks)."""
        a64, b64 = a.double(), b.double()
        energy = float(((a64 @ a64.T) * (b64.T @ b64)).sum())
        bound = float(a64.square().sum() * b64.square().sum())
        return bound > 0 and energy > 1e-9 * bound

    def check_nonzero(self, nonzero: bool) -> None:
        """Both writers call this once every module is merged (`nonzero`: some module's update is not all
        zeros): a merge whose update is zero everywhere would write the base back, labelled a merge."""
        if not nonzero:
            options = ", ".join(f"{k}={v}" for k, v in self.options.model_dump().items() if v is not None)
            raise MoergeError(
                f"merge: the {self.method.name} update is zero in every module (weights {self.weights.tolist()},"
                f" {options}); nothing would be merged"
            )

    def coefficients(self, module: str) -> torch.Tensor:
        """Linear methods only: c_k with merged Δ = Σ c_k·Δ_k for this module."""
        if self.method.coefficients is None:
            raise MoergeError(f"method: {self.method.name} is not a linear combination")
        coefficients = self.method.coefficients(self.weights, self.options_for(module))
        return coefficients * post_scale(self.options, self.layer_fraction(module))


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


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
