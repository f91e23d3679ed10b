"""Phatgoose: after an expert is trained, a per-module sigmoid gate vector is fitted on the expert's own
data with the expert frozen. At inference gates and tokens are standardised and the top-k win."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from moerge.route.policies import Policy
from moerge.route.router import OptionsModel, Router, RouterEnv, module_key, register_router


def standardise(v: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over the feature dimension (what Phatgoose compares)."""
    return (v - v.mean(-1, keepdim=True)) / (v.std(-1, keepdim=True) + 1e-6)


def fit_gates(env: RouterEnv, k: int, *, steps: int, lr: float) -> dict[str, torch.Tensor]:
    """Train expert k's gate vectors: its update at each module is scaled by sigmoid(g · x)."""
    from moerge.route.gate_training import train_router_params

    layers = {name: layer for name, layer in env.handle.layers.items() if layer.present[k]}
    gates = {name: nn.Parameter(torch.zeros(layer.A.shape[-1])) for name, layer in layers.items()}
    one_hot = torch.nn.functional.one_hot(torch.tensor(k), env.handle.layers[next(iter(layers))].num_experts)

    def weight_fn(module: str, x: torch.Tensor) -> torch.Tensor | None:
        if module not in gates:
            return None
        return torch.sigmoid(x.float() @ gates[module]).unsqueeze(-1) * one_hot.to(x.device)

    name = env.handle.expert_names[k]
    train_router_params(env, list(gates.values()), env.examples(name), weight_fn, steps=steps, lr=lr)
    return {module: g.detach() for module, g in gates.items()}


class PhatgooseOptions(OptionsModel):
    steps: int = Field(100, ge=1, description="gate training steps per expert, on its own data")
    lr: float = Field(1e-2, gt=0, description="learning rate of the gate training")


@register_router("phatgoose")
class PhatgooseRouter(Router):
    """Phatgoose: per-module sigmoid gates, fitted per frozen expert, score the tokens.

    Gates are cached as expert artifacts (kind "phatgoose") when a library is given.
    """

    options_model: ClassVar[type[OptionsModel]] = PhatgooseOptions
    options: PhatgooseOptions
    default_policy: ClassVar[Policy] = Policy("top_k", k=2, granularity="token")

    def build(self, env: RouterEnv) -> None:
        from moerge.route.artifacts import cached_per_expert

        steps, lr = self.options.steps, self.options.lr
        per_expert = cached_per_expert(
            env, "phatgoose", {"steps": steps, "lr": lr}, lambda k: fit_gates(env, k, steps=steps, lr=lr)
        )
        for name, layer in env.handle.layers.items():
            gates = torch.zeros(layer.num_experts, layer.A.shape[-1])
            for k, tensors in enumerate(per_expert):
                if name in tensors:
                    gates[k] = tensors[name]
            # Stored standardised and scaled by 1/√d, ready for the per-token dot product.
            self.set_tensor(module_key(name), standardise(gates) / math.sqrt(gates.shape[-1]))
            self.set_present(name, layer.present)

    def token_scores(self, module: str, x: torch.Tensor) -> torch.Tensor:
        return self.mask_missing(module, standardise(x.float()) @ self.state[module_key(module)].T)
