"""Merge methods: one registry, one function per method, each with its pydantic options model.

Every method takes the task vectors of one module, stacked (experts × the module's shape), the
experts' weights and the run's options (its own model, see `merge_method(options=...)`), and returns
that module's merged update. The maths follows `peft.utils.merge_utils` exactly (tests compare against
it), so a moerge merge and a peft merge of the same task vectors agree. Scaling that depends on where a
module sits in the network (task-arithmetic λ, LiNeS) is applied afterwards by `post_scale`, so it
composes with any method: its options (`MergeOptions`) are every method's.

Linear methods also register their per-expert coefficients: their merged update is Σ c_k·Δ_k, which
lets the adapter writer concatenate LoRA factors instead of approximating by SVD. The subspace methods
(tsv, iso_c, iso_cts, knots; building blocks in `subspace.py`) also register `factored`: the same merge
computed from the experts' LoRA factors, returning factors of rank ≤ Σ r_k (no dense update per expert).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moerge.errors import MoergeError
from moerge.merge import subspace
from moerge.merge.subspace import Factors
from moerge.registry import Registry
from moerge.yamlconf import Source, validate_options

MethodFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
CoefficientFn = Callable[[torch.Tensor, Any], torch.Tensor]
# Per expert (s·A, B) of one module, or None where the expert does not adapt it → merged (A, B).
FactoredFn = Callable[[Sequence[Factors | None], torch.Tensor, Any], Factors]

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


class TsvOptions(MergeOptions):
    density: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="fraction of min(out, in) singular components each expert keeps, largest first"
        " (default 1/K for K experts, the paper's choice)",
    )


class IsoCtsOptions(MergeOptions):
    common_fraction: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        description="share of the merged update's directions taken from the common subspace (the sum's top"
        " singular vectors); the rest is split evenly among the experts' task-specific directions",
    )


class KnotsOptions(TiesOptions):
    inner: Literal["ties", "linear"] = Field(
        "ties",
        description="merge applied to the experts' coordinates in the shared basis: ties (trim, elect signs,"
        " disjoint mean) or linear (weighted average, which equals plain linear merging)",
    )
    density: float = Field(
        0.2,
        gt=0.0,
        le=1.0,
        description="with inner ties: fraction of each expert's coordinates in the shared basis kept,"
        " largest magnitudes first",
    )


# --- the registry -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MethodFn
    options: type[MergeOptions]
    coefficients: CoefficientFn | None = None
    experts: int | None = None
    factored: FactoredFn | None = None

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
    factored: FactoredFn | None = None,
) -> Callable[[MethodFn], MethodFn]:
    """Register `fn` as merge method `name`, taking `options` (its model: fields, defaults, descriptions);
    `factored`, where given, computes the same merge from the experts' LoRA factors."""

    def register(fn: MethodFn) -> MethodFn:
        MERGE_METHODS.register(name, MergeMethod(name, fn, options, coefficients, experts, factored))
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


# --- subspace methods: SVDs of the experts' updates (building blocks in subspace.py) -------------------
#
# The pipeline hands every method the dense updates of one module (experts × out × in, one module at a
# time), which these methods decompose: TSV-M and Iso-CTS need each expert's own singular vectors, Iso-C
# the sum's, KnOTS the concatenation's. Each also registers `factored`, the same maths from the LoRA
# factors (QR of the stacked A's and B's, SVD of a small core; no dense update per expert), which returns
# exact factors of rank ≤ Σ r_k; MergePlan uses it (an adapter output is then exact without --rank), and
# the dense form is the reference the tests hold it to. Non-2-D
# parameters have no singular vectors: they fall back to task arithmetic. Weights scale each expert's
# update before the decomposition (KnOTS: inside its inner merge).


def _dense_factors(deltas: torch.Tensor, weights: torch.Tensor) -> list[Factors]:
    return [subspace.factors_of_dense(w * d) for d, w in zip(deltas, weights.tolist(), strict=True)]


def _present(experts: Sequence[Factors | None], weights: torch.Tensor | None = None) -> list[Factors]:
    """Every expert's (A, B), an empty pair where it lacks the module; A scaled by its weight if given."""
    n = next(a.shape[1] for a, _ in filter(None, experts))
    m = next(b.shape[0] for _, b in filter(None, experts))
    scales = weights.tolist() if weights is not None else [1.0] * len(experts)
    return [
        (pair[0] * w, pair[1]) if pair is not None else (torch.zeros(0, n), torch.zeros(m, 0))
        for pair, w in zip(experts, scales, strict=True)
    ]


def _single_precision(factors: Factors) -> Factors:
    return factors[0].float(), factors[1].float()


def _tsv_keep(options: TsvOptions, experts: int, shape: tuple[int, ...]) -> int:
    density = options.density if options.density is not None else 1 / experts
    return max(1, int(density * min(shape)))


def _tsv_factored(experts: Sequence[Factors | None], weights: torch.Tensor, options: TsvOptions) -> Factors:
    present = _present(experts, weights)
    shape = (present[0][1].shape[0], present[0][0].shape[1])
    return _single_precision(subspace.tsv(present, _tsv_keep(options, len(experts), shape)))


@merge_method("tsv", options=TsvOptions, factored=_tsv_factored)
def tsv(deltas: torch.Tensor, weights: torch.Tensor, options: TsvOptions) -> torch.Tensor:
    """TSV-M: per expert the top singular components, singular vectors decorrelated across experts, summed.

    Task Singular Vectors (Gargiulo et al., 2025): each w_k·Δ_k = U_k Σ_k V_kᵀ keeps its top density·min(out, in)
    components (1/K by default); the stacked U = [U_1 … U_K] and V are replaced by their polar factors
    U⊥ = P·Qᵀ (SVD U = P·S·Qᵀ, the nearest orthonormal matrix), and the update is U⊥ diag(Σ_1 … Σ_K) V⊥ᵀ.
    Components at the float32 noise floor (a LoRA's null space) are not kept. Forms dense updates (one
    module at a time) to take each expert's SVD; `factored` does it from the LoRA factors.
    """
    if deltas.ndim != 3:
        return weighted_sum(deltas, weights)
    a, b = subspace.tsv(_dense_factors(deltas, weights), _tsv_keep(options, len(deltas), deltas.shape[1:]))
    return (b @ a).to(deltas.dtype)


def _iso_c_factored(experts: Sequence[Factors | None], weights: torch.Tensor, options: MergeOptions) -> Factors:
    return _single_precision(subspace.iso_c(_present(experts, weights)))


@merge_method("iso_c", factored=_iso_c_factored)
def iso_c(deltas: torch.Tensor, weights: torch.Tensor, options: MergeOptions) -> torch.Tensor:
    """Iso-C: the task-arithmetic sum with all its singular values set to their mean (isotropic spectrum).

    Isotropic merging in the common subspace (Marczak et al., 2025): Σ w_k·Δ_k = U Σ Vᵀ becomes α·σ̄·U Vᵀ,
    σ̄ the mean singular value and α the `scaling` option. The mean is over the sum's non-zero singular
    values (its rank), not all min(out, in): a sum of LoRA updates is low-rank, and flattening its zeros too
    would invent directions from an arbitrary null-space basis; for full-rank updates both agree. Forms the
    dense sum (one module at a time) to take its SVD; `factored` does it from the LoRA factors.
    """
    if deltas.ndim != 3:
        return weighted_sum(deltas, weights)
    a, b = subspace.iso_c(_dense_factors(deltas, weights))
    return (b @ a).to(deltas.dtype)


def _iso_cts_factored(experts: Sequence[Factors | None], weights: torch.Tensor, options: IsoCtsOptions) -> Factors:
    return _single_precision(subspace.iso_cts(_present(experts, weights), options.common_fraction))


@merge_method("iso_cts", options=IsoCtsOptions, factored=_iso_cts_factored)
def iso_cts(deltas: torch.Tensor, weights: torch.Tensor, options: IsoCtsOptions) -> torch.Tensor:
    """Iso-CTS: Iso-C over the sum's common subspace plus each expert's task-specific directions.

    Isotropic merging in common and task-specific subspaces (Marczak et al., 2025): of the sum's R non-zero
    directions (R = min(out, in) for full fine-tunes), the top k ≈ common_fraction·R left/right singular
    vectors are kept; each expert's update with that left subspace projected out, (I − U_k U_kᵀ)·w_t·Δ_t,
    gives its top (R − k)/K directions; the stacked vectors are orthogonalised (polar factors) and every
    direction gets the mean of the kept singular values (times the `scaling` option α). Forms dense updates
    (one module at a time) for these SVDs; `factored` does it from the LoRA factors.
    """
    if deltas.ndim != 3:
        return weighted_sum(deltas, weights)
    a, b = subspace.iso_cts(_dense_factors(deltas, weights), options.common_fraction)
    return (b @ a).to(deltas.dtype)


def _merge_coordinates(coordinates: torch.Tensor, weights: torch.Tensor, options: KnotsOptions) -> torch.Tensor:
    if options.inner == "linear":
        return linear(coordinates, weights, options)
    return ties(coordinates, weights, options)


def _knots_factored(experts: Sequence[Factors | None], weights: torch.Tensor, options: KnotsOptions) -> Factors:
    basis, coordinates = subspace.knots_basis(_present(experts))
    return _single_precision((_merge_coordinates(coordinates, weights.double(), options), basis))


@merge_method("knots", options=KnotsOptions, factored=_knots_factored)
def knots(deltas: torch.Tensor, weights: torch.Tensor, options: KnotsOptions) -> torch.Tensor:
    """KnOTS: align the experts in the SVD basis of their concatenation, merge there (ties or linear), map back.

    KnOTS (Stoica et al., 2024): [Δ_1 … Δ_K] = U Σ [V_1ᵀ … V_Kᵀ] (one SVD, columns concatenated); the
    experts' coordinates Σ V_kᵀ in the shared basis U are merged with `inner` (TIES with density and
    majority_sign, weighted by the experts' weights, as the paper's KnOTS-TIES; or the weighted average),
    and U maps the result back. Forms dense updates (one module at a time) for the SVD; `factored` takes it
    from the factors: the concatenation is [B_1 … B_K]·blockdiag(A_1 … A_K), decomposed via QR.
    """
    if deltas.ndim != 3:
        return weighted_sum(deltas, weights)
    basis, coordinates = subspace.knots_basis(_dense_factors(deltas, torch.ones(len(deltas))))
    return (basis @ _merge_coordinates(coordinates, weights.double(), options)).to(deltas.dtype)


# --- module-position scaling ------------------------------------------------------------------------


def post_scale(options: MergeOptions, layer_fraction: float) -> float:
    """Factor on a module's merged update: λ·LiNeS(ℓ), LiNeS(ℓ) = α + β·(ℓ−1)/(L−1) when enabled;
    `layer_fraction` is (ℓ−1)/(L−1), the module's depth."""
    factor = options.scaling
    if options.lines_alpha is not None and options.lines_beta is not None:
        factor *= options.lines_alpha + options.lines_beta * layer_fraction
    return factor
