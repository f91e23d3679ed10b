"""Glue between a router, a policy and the stacked layers: scores → weights, per layer, per forward.

Example- and task-level weights are computed on the prompt (the prefill forward) and reused for every
generated token, so `generate` routes each example once.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from moerge.route.policies import Policy, pool_examples, pool_tasks
from moerge.route.router import Router
from moerge.route.stacked import StackedModel, Step


class Routing:
    """Installs itself as the weight function of every stacked layer of `handle`."""

    def __init__(self, handle: StackedModel, router: Router, policy: Policy) -> None:
        self.handle = handle
        self.router = router
        self.policy = policy
        self._step: Step | None = None
        self._cache: dict[str, torch.Tensor] = {}
        self._example: torch.Tensor | None = None
        self.records: dict[str, list[torch.Tensor]] | None = None
        self.token_records: list[dict[str, torch.Tensor]] | None = None
        for layer in handle.layers.values():
            layer.merge = policy.aggregation == "merge"
        handle.set_weight_fn(self.weights)
        handle.routing = self

    def parameter_counts(self) -> tuple[int, int]:
        """(added, active) parameters, for cost comparisons with merges and single adapters.

        `added`: every stacked expert factor (A and B of all K experts, ranks zero-padded to the
        largest, as the routed model holds them). `active`: the share one row (a token; an example or
        task under those granularities) can use, added × n / K, with n = `Policy.max_experts(K)`, the
        most experts the policy can select: k for top_k, K for dense, ⌈p·K⌉ for top_p, ⌊1/threshold⌋
        for threshold (capped at K, at least 1; exact ties for the best expert, as under uniform scores,
        are all kept and can exceed it). An upper bound: top_p and threshold often keep fewer, and a
        router that scores experts -inf (the oracle, missing modules) leaves them out.
        """
        added = sum(int(layer.A.numel() + layer.B.numel()) for layer in self.handle.layers.values())
        experts = len(self.handle.expert_names)
        return added, added * self.policy.max_experts(experts) // max(experts, 1)

    def start_recording(self, *, per_token: bool = False) -> None:
        """Keep each forward's per-example weights [b, K] per module (for `route explain`); with
        `per_token`, also each generated token's weights [b, K] per module (`token_records`, one
        mapping per decoding step), for showing which expert carried which token."""
        self.records = defaultdict(list)
        self.token_records = [] if per_token else None

    def _new_step(self, step: Step) -> None:
        self._step = step
        if self.token_records is not None and not step.prefill:
            self.token_records.append({})
        if step.prefill:
            self._cache.clear()
            self._example = self.router.example_scores(step)

    def weights(self, module: str, x: torch.Tensor) -> torch.Tensor:
        step = self.handle.step
        if step is not self._step:
            self._new_step(step)
        if module in self._cache:
            self._record_token(module, self._cache[module])
            return self._cache[module]
        token = self.router.token_scores(module, x)
        example = self._example
        if token is not None and self.policy.granularity == "token":
            scores = token if example is None else token + example.unsqueeze(1).to(token.dtype)
            weights = self.policy.select(scores)
            if self.records is not None and step.prefill:
                self._record(module, pool_examples(weights, step.mask))
            self._record_token(module, weights[:, -1])
            return weights
        if token is not None:
            pooled = pool_examples(token, step.mask)
            scores = pooled if example is None else pooled + example.to(pooled.dtype)
        else:
            scores = example
        if self.policy.granularity == "task":
            scores = pool_tasks(scores, step.context.get("task_ids"))
        weights = self.policy.select(scores)
        self._cache[module] = weights
        if self.records is not None:
            self._record(module, weights)
        return weights

    def _record(self, module: str, weights: torch.Tensor) -> None:
        self.records[module].append(weights.detach().float().cpu())

    def _record_token(self, module: str, weights: torch.Tensor) -> None:
        """A decoding step's weights [b, K] of `module` (the example's own, under example routing)."""
        if self.token_records and not self._step.prefill:
            self.token_records[-1][module] = weights.detach().float().cpu()
