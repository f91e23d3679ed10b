"""Merge methods: one registry, one function per method, each with its pydantic options model.

Every method takes the task vectors of one module, stacked (experts × the module's shape), the
experts' weights and the run's options (its own model, see `merge_method(options=...)`), and returns
that module's merged update. The maths follows `peft.utils.merge_utils` exactly (tests compare against
it), so a moerge merge and a peft merge of the same task vectors agree. Scaling that depends on where a
module sits in the network (task-arithmetic λ, LiNeS) is applied afterwards by `post_scale`, so it
composes with any method: its options (`MergeOptions`) are every method's.

Linear methods also register their per-expert coefficients: their merged update is Σ c_k·Δ_k, which
lets the adapter writer concatenate LoRA factors instead of approximating by SVD.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moerge.errors import MoergeError
from moerge.registry import Registry
from moerge.yamlconf import Source, validate_options

MethodFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
CoefficientFn = Callable[[torch.Tensor, Any], torch.Tensor]

# --- options ----------------------------------------------------------------------------------------

_LINES_ALPHA = "LiNeS depth scaling: factor on the first layer's update (set together with lines_beta)"
_LINES_BETA = "LiNeS depth scaling: factor added linearly up to the last layer (set together with lines_alpha)"


class MergeOptions(BaseModel):
    """Options every merge method takes: factors on each module's merged update."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    scaling: float = Field(1.0, description="λ multiplying every module's merged update")

    @field_validator("scaling")
    @classmethod
    def _nonzero_scaling(cls, value: float) -> float:
        if value == 0:
            raise ValueError("must not be 0 (the merged update would be zero everywhere)")
        return value

    lines_alpha: float | None = Field(None, description=_LINES_ALPHA)
    lines_beta: float | None = Field(None, description=_LINES_BETA)

    @model_validator(mode="after")
    def _lines_both_or_neither(self) -> MergeOptions:
        if (self.lines_alpha is None) != (self.lines_beta is None):
            raise ValueError("lines_alpha/lines_beta: give both or neither")
        return self


class LinesOptions(MergeOptions):
    lines_alpha: float | None = Field(0.5, description=_LINES_ALPHA)
    lines_beta: float | None = Field(0.5, description=_LINES_BETA)


def _majority_sign() -> Any:
    return Field(
        "total", description="sign elected per entry: by the experts' summed values (total) or by count (frequency)"
    )


class MagnitudeOptions(MergeOptions):
    density: float = Field(
        0.2, gt=0.0, le=1.0, description="fraction of each expert's entries kept, largest magnitudes first"
    )


class TiesOptions(MagnitudeOptions):
    majority_sign: Literal["total", "frequency"] = _majority_sign()


class SeededOptions(MergeOptions):
    """Options of methods that draw random numbers: each module draws its own stream from `seed`."""

    seed: int = Field(0, description="seed of the random drops (each module derives its own stream from it)")


class DareOptions(SeededOptions):
    density: float = Field(
        0.5, gt=0.0, le=1.0, description="probability of keeping each entry; kept entries are rescaled by 1/density"
    )


class DareTiesOptions(DareOptions):
    majority_sign: Literal["total", "frequency"] = _majority_sign()


class BreadcrumbsOptions(MergeOptions):
    density: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="fraction of each expert's entries kept below the outliers, largest magnitudes first",
    )
    gamma: float = Field(
        0.01, ge=0.0, lt=1.0, description="fraction of each expert's largest-magnitude entries dropped as outliers"
    )


# --- the registry -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MethodFn
    options: type[MergeOptions]
    coefficients: CoefficientFn | None = None
    experts: int | None = None

    @property
    def is_linear(self) -> bool:
        return self.coefficients is not None

    @property
    def summary(self) -> str:
        """The first line of the method's docstring (for help texts)."""
        return (self.fn.__doc__ or "").strip().splitlines()[0]

    def parse_options(self, raw: Any, source: Source | None = None) -> MergeOptions:
        """The user's parameters as this method's options; a key it does not take is refused with the
        options it does take. `source` points at the parameters' mapping in the user's file."""
        source = source or Source("merge").at("parameters")
        return validate_options(self.options, raw, source, f"merge method {self.name!r}")


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method")


def merge_method(
    name: str,
    *,
    options: type[MergeOptions] = MergeOptions,
    coefficients: CoefficientFn | None = None,
    experts: int | None = None,
) -> Callable[[MethodFn], MethodFn]:
    """Register `fn` as merge method `name`, taking `options` (its model: fields, defaults, descriptions)."""

    def register(fn: MethodFn) -> MethodFn:
        MERGE_METHODS.register(name, MergeMethod(name, fn, options, coefficients, experts))
        return fn

    return register


# --- building blocks (peft.utils.merge_utils semantics) -------------------------------------------


def weighted_sum(deltas: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Σ c_k·Δ_k as one matrix-vector product over the stacked experts."""
    return (coefficients.to(deltas.dtype) @ deltas.reshape(len(deltas), -1)).reshape(deltas.shape[1:])


def magnitude_mask(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """Per expert, exactly the top `int(density·n)` entries by magnitude. Among equal magnitudes the
    entries are those peft's `magnitude_prune`/`ties` keep: the same `torch.topk` call picks them."""
    flat = deltas.abs().reshape(len(deltas), -1)
    k = int(density * flat.shape[1])
    if k >= flat.shape[1]:
        return torch.ones_like(deltas, dtype=torch.bool)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    for row, kept in zip(flat, mask, strict=True):
        kept[torch.topk(row, k=k, largest=True).indices] = True
    return mask.reshape(deltas.shape)


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


def _soup_coefficients(weights: torch.Tensor, options: MergeOptions) -> torch.Tensor:
    total = weights.sum()
    if total == 0:
        raise MoergeError("weights: linear merge needs weights with a non-zero sum")
    return weights / total


def _sum_coefficients(weights: torch.Tensor, options: MergeOptions) -> torch.Tensor:
    return weights


@merge_method("linear", coefficients=_soup_coefficients)
def linear(deltas: torch.Tensor, weights: torch.Tensor, options: MergeOptions) -> torch.Tensor:
    """Weighted average Σ w_k·Δ_k / Σ w_k (a uniform soup with equal weights)."""
    return weighted_sum(deltas, _soup_coefficients(weights, options))


@merge_method("task_arithmetic", coefficients=_sum_coefficients)
def task_arithmetic(deltas: torch.Tensor, weights: torch.Tensor, options: MergeOptions) -> torch.Tensor:
    """Σ w_k·Δ_k (peft `task_arithmetic`)."""
    return weighted_sum(deltas, weights)


@merge_method("lines", options=LinesOptions, coefficients=_sum_coefficients)
def lines(deltas: torch.Tensor, weights: torch.Tensor, options: LinesOptions) -> torch.Tensor:
    """Task arithmetic scaled per layer ℓ of L by LiNeS λ(ℓ) = α + β·(ℓ−1)/(L−1) (on by default)."""
    return weighted_sum(deltas, weights)


@merge_method("magnitude_prune", options=MagnitudeOptions)
def magnitude_prune(deltas: torch.Tensor, weights: torch.Tensor, options: MagnitudeOptions) -> torch.Tensor:
    """Keep each expert's top-density entries by magnitude, then Σ w_k·Δ_k (peft `magnitude_prune`)."""
    return weighted_sum(deltas * magnitude_mask(deltas, options.density), weights)


@merge_method("ties", options=TiesOptions)
def ties(deltas: torch.Tensor, weights: torch.Tensor, options: TiesOptions) -> torch.Tensor:
    """Trim to the top-density magnitudes, elect signs, disjoint mean (peft `ties`)."""
    trimmed = deltas * magnitude_mask(deltas, options.density)
    return elect_and_merge(trimmed, weights, options.majority_sign)


@merge_method("dare_linear", options=DareOptions)
def dare_linear(deltas: torch.Tensor, weights: torch.Tensor, options: DareOptions) -> torch.Tensor:
    """Drop entries with probability 1−density, rescale by 1/density, Σ w_k·Δ_k (peft `dare_linear`)."""
    return weighted_sum(random_keep(deltas, options.density, options.seed), weights)


@merge_method("dare_ties", options=DareTiesOptions)
def dare_ties(deltas: torch.Tensor, weights: torch.Tensor, options: DareTiesOptions) -> torch.Tensor:
    """DARE drops, then TIES sign election and disjoint mean (peft `dare_ties`)."""
    dropped = random_keep(deltas, options.density, options.seed)
    return elect_and_merge(dropped, weights, options.majority_sign)


@merge_method("breadcrumbs", options=BreadcrumbsOptions)
def breadcrumbs(deltas: torch.Tensor, weights: torch.Tensor, options: BreadcrumbsOptions) -> torch.Tensor:
    """Per expert, drop the top-gamma outliers and keep the next density fraction by magnitude, Σ w_k·Δ_k."""
    flat = deltas.abs().reshape(len(deltas), -1)
    n = flat.shape[1]
    n_top = int(options.gamma * n)
    n_keep = min(int(options.density * n), n - n_top)
    order = flat.argsort(dim=1, descending=True)
    mask = torch.zeros_like(flat)
    mask.scatter_(1, order[:, n_top : n_top + n_keep], 1.0)
    return weighted_sum(deltas * mask.reshape(deltas.shape), weights)


@merge_method("slerp", experts=2)
def slerp(deltas: torch.Tensor, weights: torch.Tensor, options: MergeOptions) -> torch.Tensor:
    """Spherical interpolation of two task vectors at t = w₂/(w₁+w₂); linear when nearly parallel."""
    t = float(weights[1] / weights.sum())
    a, b = deltas[0].flatten(), deltas[1].flatten()
    cos = torch.dot(a, b) / (a.norm() * b.norm()).clamp(min=1e-12)
    omega = math.acos(float(cos.clamp(-1.0, 1.0)))
    if abs(math.sin(omega)) < 1e-6:
        return (1 - t) * deltas[0] + t * deltas[1]
    return (math.sin((1 - t) * omega) * deltas[0] + math.sin(t * omega) * deltas[1]) / math.sin(omega)


# --- module-position scaling ------------------------------------------------------------------------


def post_scale(options: MergeOptions, layer_fraction: float) -> float:
    """Factor on a module's merged update: λ·LiNeS(ℓ), LiNeS(ℓ) = α + β·(ℓ−1)/(L−1) when enabled;
    `layer_fraction` is (ℓ−1)/(L−1), the module's depth."""
    factor = options.scaling
    if options.lines_alpha is not None and options.lines_beta is not None:
        factor *= options.lines_alpha + options.lines_beta * layer_fraction
    return factor
