"""Selection policies shared by all routers: scores [..., K] → routing weights [..., K].

A policy picks a set of experts per row (top_k, top_p, threshold, dense) and gives them a softmax
over their scores; unselected experts get weight 0. Granularity says which rows exist: one per token,
one per example (token scores mean-pooled over the prompt's non-padding positions) or one per task
(example scores averaged over the task's examples in the batch). Aggregation says how weights are used:
`mix` mixes expert outputs, `merge` applies a per-example merged update ΔW = Σ w B A (equal for LoRA;
see `StackedLoRALinear.delta`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from moerge.errors import MoergeError
from moerge.registry import Registry
from moerge.yamlconf import Source, first_error, validate_options

Keep = Callable[[torch.Tensor, "Policy"], torch.Tensor]  # probabilities [..., K] → kept experts (bool)
Most = Callable[["Policy", int], int]


@dataclass(frozen=True)
class Selector:
    """A selection rule: `keep(probs, policy)` marks the experts each row keeps; `most(policy, K)` is
    the most experts one row can keep out of K (what `Routing.parameter_counts` calls active)."""

    keep: Keep
    most: Most


SELECTORS: Registry[Selector] = Registry("selection policy")


def register_selector(name: str, *, most: Most) -> Callable[[Keep], Keep]:
    def register(keep: Keep) -> Keep:
        SELECTORS.register(name, Selector(keep, most))
        return keep

    return register


@register_selector("top_k", most=lambda policy, experts: min(policy.k, experts))
def top_k(probs: torch.Tensor, policy: Policy) -> torch.Tensor:
    """The k most probable experts."""
    k = min(policy.k, probs.shape[-1])
    idx = probs.topk(k, dim=-1).indices
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, idx, True)


@register_selector("top_p", most=lambda policy, experts: min(max(math.ceil(policy.p * experts), 1), experts))
def top_p(probs: torch.Tensor, policy: Policy) -> torch.Tensor:
    """The smallest set whose probability mass reaches p (at least one expert).

    At most ⌈p·K⌉ experts: the experts ranked above the last kept one hold less than p, and the n-1
    most probable of K hold at least (n-1)/K (a uniform row keeps exactly ⌈p·K⌉).
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the experts ranked above
    keep = before < policy.p
    keep[..., 0] = True
    return torch.zeros_like(keep).scatter(-1, order, keep)


def _most_above_threshold(policy: Policy, experts: int) -> int:
    """At most ⌊1/threshold⌋ probabilities can each reach the threshold, and the best is always kept.
    Not counted: experts tied exactly for the best are all kept (uniform scores keep every expert)."""
    if policy.threshold <= 0:
        return experts
    return min(max(math.floor(1 / policy.threshold), 1), experts)


@register_selector("threshold", most=_most_above_threshold)
def threshold(probs: torch.Tensor, policy: Policy) -> torch.Tensor:
    """Every expert with probability ≥ threshold (the best one always)."""
    keep = probs >= policy.threshold
    return keep | (probs == probs.amax(-1, keepdim=True))


@register_selector("dense", most=lambda policy, experts: experts)
def dense(probs: torch.Tensor, policy: Policy) -> torch.Tensor:
    """All experts."""
    return torch.ones_like(probs, dtype=torch.bool)


class Policy(BaseModel):
    """How scores become weights. Built as `Policy("top_k", k=2)` or `Policy(**saved)` (a bad value is
    a one-line MoergeError), or from user input with `parse_policy` (errors name the file or flag)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("top_k", description="selection rule: top_k, top_p, threshold or dense")
    k: int = Field(2, ge=1, description="experts kept per row (top_k)")
    p: float = Field(0.9, gt=0, le=1, description="probability mass the kept experts reach (top_p)")
    threshold: float = Field(0.1, description="least probability an expert needs to be kept (threshold)")
    temperature: float = Field(1.0, gt=0, description="scores are divided by this before the softmax")
    granularity: Literal["token", "example", "task"] = Field(
        "token", description="one routing decision per token, per example, or per task of the batch"
    )
    aggregation: Literal["mix", "merge"] = Field(
        "mix", description="mix the experts' outputs, or apply one merged update per example"
    )

    def __init__(self, name: str = "top_k", **values: Any) -> None:
        try:
            super().__init__(name=name, **values)
        except ValidationError as exc:
            raise first_error(Source("policy"), exc) from None

    # Marked as pydantic's own __init__ (as pydantic's RootModel does), so validation from data
    # (`parse_policy`, a recipe's nested policy) skips it and keeps errors located in their file.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        try:
            SELECTORS.get(name)
        except MoergeError as exc:  # the registry's standard message, located by the caller's source
            raise ValueError(str(exc)) from None
        return name

    @field_validator("aggregation")
    @classmethod
    def _merge_needs_examples(cls, aggregation: str, info: ValidationInfo) -> str:
        if aggregation == "merge" and info.data.get("granularity") == "token":
            raise ValueError("'merge' needs granularity 'example' or 'task' (one update per example)")
        return aggregation

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Weights: softmax over the selected experts' scores, 0 elsewhere (-inf scores never win)."""
        dtype = scores.dtype
        scores = scores.to(torch.promote_types(dtype, torch.float32))  # softmax in at least float32
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.name == "top_k":
            # Fast path with the same result (fewer ops per layer and token while generating): softmax
            # over the k best scores, scattered back. Routers give every row at least one finite score.
            top, idx = scores.topk(min(self.k, scores.shape[-1]), dim=-1)
            return torch.zeros_like(scores).scatter(-1, idx, torch.softmax(top, dim=-1)).to(dtype)
        probs = torch.softmax(scores, dim=-1)
        keep = SELECTORS.get(self.name).keep(probs, self) & torch.isfinite(scores)
        weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
        return torch.nan_to_num(weights, nan=0.0).to(dtype)

    def max_experts(self, num_experts: int) -> int:
        """The most of `num_experts` experts one row (token or example) can get weight from."""
        return SELECTORS.get(self.name).most(self, num_experts)

    def updated(self, overrides: Mapping[str, Any] | None, source: Source | str = "policy") -> Policy:
        """This policy with the non-None values of `overrides` on top (unset command-line flags are None)."""
        values = {k: v for k, v in (overrides or {}).items() if v is not None}
        return parse_policy({**self.to_dict(), **values}, source) if values else self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


def parse_policy(raw: Any, source: Source | str = "policy") -> Policy:
    """A policy from user input (a recipe's mapping, config.json, flags); errors are one line naming
    `source` and the field, and an unknown key lists the policy's fields."""
    return validate_options(Policy, dict(raw) if isinstance(raw, Mapping) else raw, source, "the selection policy")


def pool_examples(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of token scores [b, s, K] over each example's non-padding positions → [b, K]."""
    if mask is None:
        return scores.mean(1)
    mask = mask.to(scores.device).bool().unsqueeze(-1)
    total = torch.where(mask, scores, torch.zeros((), dtype=scores.dtype)).sum(1)
    return total / mask.sum(1).clamp(min=1)


def pool_tasks(scores: torch.Tensor, task_ids: Sequence[Any] | None) -> torch.Tensor:
    """Replace each example's scores [b, K] by the mean over the batch's examples of the same task."""
    if task_ids is None:
        raise MoergeError("granularity 'task' needs task ids: wrap the call in routing_context(task_ids=[...])")
    if len(task_ids) != scores.shape[0]:
        raise MoergeError(f"routing_context: {len(task_ids)} task ids for a batch of {scores.shape[0]}")
    labels = {t: i for i, t in enumerate(dict.fromkeys(task_ids))}
    group = torch.tensor([labels[t] for t in task_ids], device=scores.device)
    sums = scores.new_zeros(len(labels), scores.shape[-1]).index_add(0, group, scores)
    counts = torch.bincount(group, minlength=len(labels)).to(scores.dtype).unsqueeze(-1)
    return (sums / counts)[group]
