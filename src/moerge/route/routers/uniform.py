"""Uniform: every selected expert gets the same weight (the simplest multi-expert baseline)."""

from __future__ import annotations

from typing import ClassVar

import torch

from moerge.route.policies import Policy
from moerge.route.router import Router, register_router
from moerge.route.stacked import Step


@register_router("uniform")
class UniformRouter(Router):
    """Uniform: equal scores; the default dense policy gives each of the K experts 1/K.

    Takes no options.
    """

    default_policy: ClassVar[Policy] = Policy("dense", granularity="example")

    def example_scores(self, step: Step) -> torch.Tensor:
        return torch.zeros(step.mask.shape[0], self.num_experts)
