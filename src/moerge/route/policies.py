"""Selection policies shared by all routers: scores [..., K] → routing weights [..., K].

A policy picks a set of experts per row (top_k, top_p, threshold, dense) and gives them a softmax
over their scores; unselected experts get weight 0. Granularity says which rows exist: one per token,
one per example (token scores mean-pooled over the prompt's non-padding positions) or one per task
(example scores averaged over the task's examples in the batch). Aggregation says how weights are used:
`mix` mixes expert outputs, `merge` applies a per-example merged update ΔW = Σ w B A (equal for LoRA;
see `StackedLoRALinear.delta`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from moerge.errors import MoergeError

Selector = Callable[[torch.Tensor, "Policy"], torch.Tensor]
SELECTORS: dict[str, Selector] = {}
GRANULARITIES = ("token", "example", "task")
AGGREGATIONS = ("mix", "merge")


def register_selector(name: str) -> Callable[[Selector], Selector]:
    def register(fn: Selector) -> Selector:
        SELECTORS[name] = fn
        return fn

    return register


@register_selector("top_k")
def top_k(probs: torch.Tensor, policy: Policy) -> torch.Tensor:
    """The k most probable experts."""
    k = min(policy.k, probs.shape[-1])
    idx = probs.topk(k, dim=-1).indices
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, idx, True)


@register_selector("top_p")
def top_p(probs: torch.Tensor, policy: Policy) -> torch.Tensor:
    """The smallest set whose probability mass reaches p (at least one expert)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the experts ranked above
    keep = before < policy.p
    keep[..., 0] = True
    return torch.zeros_like(keep).scatter(-1, order, keep)


@register_selector("threshold")
def threshold(probs: torch.Tensor, policy: Policy) -> torch.Tensor:
    """Every expert with probability ≥ threshold (the best one always)."""
    keep = probs >= policy.threshold
    return keep | (probs == probs.amax(-1, keepdim=True))


@register_selector("dense")
def dense(probs: torch.Tensor, policy: Policy) -> torch.Tensor:
    """All experts."""
    return torch.ones_like(probs, dtype=torch.bool)


@dataclass(frozen=True)
class Policy:
    """How scores become weights. `temperature` divides scores before the softmax."""

    name: str = "top_k"
    k: int = 2
    p: float = 0.9
    threshold: float = 0.1
    temperature: float = 1.0
    granularity: str = "token"
    aggregation: str = "mix"

    def __post_init__(self) -> None:
        if self.name not in SELECTORS:
            raise MoergeError(f"policy {self.name!r}: unknown; expected one of {', '.join(sorted(SELECTORS))}")
        if self.granularity not in GRANULARITIES:
            raise MoergeError(f"granularity {self.granularity!r}: expected one of {', '.join(GRANULARITIES)}")
        if self.aggregation not in AGGREGATIONS:
            raise MoergeError(f"aggregation {self.aggregation!r}: expected one of {', '.join(AGGREGATIONS)}")
        if self.aggregation == "merge" and self.granularity == "token":
            raise MoergeError("aggregation 'merge' needs granularity 'example' or 'task' (one update per example)")
        if self.k < 1 or not 0 < self.p <= 1 or self.temperature <= 0:
            raise MoergeError("policy: expected k ≥ 1, 0 < p ≤ 1 and temperature > 0")

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
        keep = SELECTORS[self.name](probs, self) & torch.isfinite(scores)
        weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
        return torch.nan_to_num(weights, nan=0.0).to(dtype)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
