"""Merge methods: one registry, one function per method.

Every method takes the task vectors of one module, stacked (experts × the module's shape), the
experts' weights and the run's `MergeParams`, and returns that module's merged update. The maths
follows `peft.utils.merge_utils` exactly (tests compare against it), so a moerge merge and a peft
merge of the same task vectors agree. Scaling that depends on where a module sits in the network
(task-arithmetic λ, LiNeS) is applied afterwards by `post_scale`, so it composes with any method.

Linear methods also register their per-expert coefficients: their merged update is Σ c_k·Δ_k, which
lets the adapter writer concatenate LoRA factors instead of approximating by SVD.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from moerge.errors import MoergeError

MethodFn = Callable[[torch.Tensor, torch.Tensor, "MergeParams"], torch.Tensor]
CoefficientFn = Callable[[torch.Tensor, "MergeParams"], torch.Tensor]


@dataclass(frozen=True)
class MergeParams:
    """Method parameters of one run. `layer_fraction` and `seed` are set per module by the runner."""

    density: float = 1.0
    majority_sign: Literal["total", "frequency"] = "total"
    gamma: float = 0.01
    scaling: float = 1.0
    lines_alpha: float | None = None
    lines_beta: float | None = None
    seed: int = 0
    layer_fraction: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.density <= 1.0:
            raise MoergeError(f"parameters.density: {self.density} is outside [0, 1]")
        if not 0.0 <= self.gamma < 1.0:
            raise MoergeError(f"parameters.gamma: {self.gamma} is outside [0, 1)")
        if self.majority_sign not in ("total", "frequency"):
            raise MoergeError(f"parameters.majority_sign: {self.majority_sign!r} is not one of 'total', 'frequency'")
        if (self.lines_alpha is None) != (self.lines_beta is None):
            raise MoergeError("parameters.lines_alpha/lines_beta: give both or neither")

    def recorded(self) -> dict[str, Any]:
        """The user-facing parameters, for provenance (per-module fields left out)."""
        out = dataclasses.asdict(self)
        out.pop("layer_fraction")
        return out


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MethodFn
    coefficients: CoefficientFn | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    experts: int | None = None

    @property
    def is_linear(self) -> bool:
        return self.coefficients is not None


MERGE_METHODS: dict[str, MergeMethod] = {}


def merge_method(
    name: str,
    *,
    coefficients: CoefficientFn | None = None,
    defaults: dict[str, Any] | None = None,
    experts: int | None = None,
) -> Callable[[MethodFn], MethodFn]:
    """Register `fn` as merge method `name`; `defaults` are this method's parameter defaults."""

    def register(fn: MethodFn) -> MethodFn:
        MERGE_METHODS[name] = MergeMethod(name, fn, coefficients, dict(defaults or {}), experts)
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    if name not in MERGE_METHODS:
        known = ", ".join(sorted(MERGE_METHODS))
        raise MoergeError(f"method: unknown merge method {name!r} (known: {known})")
    return MERGE_METHODS[name]


# --- building blocks (peft.utils.merge_utils semantics) -------------------------------------------


def weighted_sum(deltas: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Σ c_k·Δ_k as one matrix-vector product over the stacked experts."""
    return (coefficients.to(deltas.dtype) @ deltas.reshape(len(deltas), -1)).reshape(deltas.shape[1:])


def magnitude_mask(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """Per expert, keep the top `int(density·n)` entries by magnitude (peft's topk, via one kthvalue)."""
    flat = deltas.abs().reshape(len(deltas), -1)
    k = int(density * flat.shape[1])
    if density >= 1:
        return torch.ones_like(deltas, dtype=torch.bool)
    if k == 0:
        return torch.zeros_like(deltas, dtype=torch.bool)
    threshold = torch.kthvalue(flat, flat.shape[1] - k + 1, dim=1).values
    return (flat >= threshold[:, None]).reshape(deltas.shape)


def random_keep(deltas: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """DARE: keep each entry with probability `density` and rescale by 1/density (expectation kept)."""
    if density >= 1:
        return deltas
    if density <= 0:
        return torch.zeros_like(deltas)
    generator = torch.Generator().manual_seed(seed)
    kept = [d * torch.bernoulli(torch.full_like(d, density), generator=generator) for d in deltas]
    return torch.stack(kept) / density


def elect_and_merge(deltas: torch.Tensor, weights: torch.Tensor, method: str) -> torch.Tensor:
    """TIES: elect each entry's sign by mass (`total`) or count (`frequency`), average the agreeing."""
    mass = deltas.sum(dim=0) if method == "total" else deltas.sign().sum(dim=0)
    majority = torch.where(mass >= 0, 1.0, -1.0)
    agree = (deltas * majority > 0).to(deltas.dtype)  # zeros never agree, as in peft
    count = agree.reshape(len(deltas), -1).sum(dim=0).clamp(min=1).reshape(deltas.shape[1:])
    return weighted_sum(agree.mul_(deltas), weights) / count


# --- methods: `deltas` is (experts, *shape), one task vector per expert ---------------------------


def _soup_coefficients(weights: torch.Tensor, params: MergeParams) -> torch.Tensor:
    total = weights.sum()
    if total == 0:
        raise MoergeError("weights: linear merge needs weights with a non-zero sum")
    return weights / total


def _sum_coefficients(weights: torch.Tensor, params: MergeParams) -> torch.Tensor:
    return weights


@merge_method("linear", coefficients=_soup_coefficients)
def linear(deltas: torch.Tensor, weights: torch.Tensor, params: MergeParams) -> torch.Tensor:
    """Weighted average (a uniform soup with equal weights)."""
    return weighted_sum(deltas, _soup_coefficients(weights, params))


@merge_method("lines", coefficients=_sum_coefficients, defaults={"lines_alpha": 0.5, "lines_beta": 0.5})
@merge_method("task_arithmetic", coefficients=_sum_coefficients)
def task_arithmetic(deltas: torch.Tensor, weights: torch.Tensor, params: MergeParams) -> torch.Tensor:
    """Σ w_k·Δ_k (peft `task_arithmetic`). As `lines`, LiNeS depth scaling is on by default."""
    return weighted_sum(deltas, weights)


@merge_method("magnitude_prune", defaults={"density": 0.2})
def magnitude_prune(deltas: torch.Tensor, weights: torch.Tensor, params: MergeParams) -> torch.Tensor:
    return weighted_sum(deltas * magnitude_mask(deltas, params.density), weights)


@merge_method("ties", defaults={"density": 0.2})
def ties(deltas: torch.Tensor, weights: torch.Tensor, params: MergeParams) -> torch.Tensor:
    """Trim to the top-density magnitudes, elect signs, disjoint mean (peft `ties`)."""
    trimmed = deltas * magnitude_mask(deltas, params.density)
    return elect_and_merge(trimmed, weights, params.majority_sign)


@merge_method("dare_linear", defaults={"density": 0.5})
def dare_linear(deltas: torch.Tensor, weights: torch.Tensor, params: MergeParams) -> torch.Tensor:
    return weighted_sum(random_keep(deltas, params.density, params.seed), weights)


@merge_method("dare_ties", defaults={"density": 0.5})
def dare_ties(deltas: torch.Tensor, weights: torch.Tensor, params: MergeParams) -> torch.Tensor:
    dropped = random_keep(deltas, params.density, params.seed)
    return elect_and_merge(dropped, weights, params.majority_sign)


@merge_method("breadcrumbs", defaults={"density": 0.9, "gamma": 0.01})
def breadcrumbs(deltas: torch.Tensor, weights: torch.Tensor, params: MergeParams) -> torch.Tensor:
    """Per expert, drop the top-`gamma` outliers and keep the next `density` fraction by magnitude."""
    flat = deltas.abs().reshape(len(deltas), -1)
    n = flat.shape[1]
    n_top = int(params.gamma * n)
    n_keep = min(int(params.density * n), n - n_top)
    order = flat.argsort(dim=1, descending=True)
    mask = torch.zeros_like(flat)
    mask.scatter_(1, order[:, n_top : n_top + n_keep], 1.0)
    return weighted_sum(deltas * mask.reshape(deltas.shape), weights)


@merge_method("slerp", experts=2)
def slerp(deltas: torch.Tensor, weights: torch.Tensor, params: MergeParams) -> torch.Tensor:
    """Spherical interpolation of two task vectors at t = w₂/(w₁+w₂); linear when nearly parallel."""
    t = float(weights[1] / weights.sum())
    a, b = deltas[0].flatten(), deltas[1].flatten()
    cos = torch.dot(a, b) / (a.norm() * b.norm()).clamp(min=1e-12)
    omega = math.acos(float(cos.clamp(-1.0, 1.0)))
    if abs(math.sin(omega)) < 1e-6:
        return (1 - t) * deltas[0] + t * deltas[1]
    return (math.sin((1 - t) * omega) * deltas[0] + math.sin(t * omega) * deltas[1]) / math.sin(omega)


# --- module-position scaling ------------------------------------------------------------------------


def post_scale(params: MergeParams) -> float:
    """Factor on a module's merged update: λ·LiNeS(ℓ), LiNeS(ℓ) = α + β·(ℓ−1)/(L−1) when enabled."""
    factor = params.scaling
    if params.lines_alpha is not None and params.lines_beta is not None:
        factor *= params.lines_alpha + params.lines_beta * params.layer_fraction
    return factor
