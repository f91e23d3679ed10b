"""Uniform: every selected expert gets the same weight (the simplest multi-expert baseline)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from moerge.route.router import Router, register_router
from moerge.route.stacked import Step


@register_router("uniform")
class UniformRouter(Router):
    """Equal scores; with the default `dense` policy each of the K experts gets 1/K."""

    default_policy: ClassVar[dict[str, Any]] = {"name": "dense", "granularity": "example"}

    def example_scores(self, step: Step) -> torch.Tensor:
        return torch.zeros(step.mask.shape[0], self.num_experts)
