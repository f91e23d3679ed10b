"""Learned token gates (the X-LoRA / LoRAMoE / MixLoRA family): per module a linear gate over the frozen
experts, trained on their mixed data with a load-balancing loss so every expert gets used."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from moerge.route.policies import Policy
from moerge.route.router import OptionsModel, Router, RouterEnv, module_key, register_router


def load_balancing_loss(scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer style K·Σ_k f_k·P_k: f = share of tokens routed to k, P = mean probability."""
    probs = torch.softmax(scores.float(), -1).flatten(0, -2)
    routed = (weights > 0).float().flatten(0, -2)
    return scores.shape[-1] * (routed.mean(0) * probs.mean(0)).sum()


class LearnedOptions(OptionsModel):
    steps: int = Field(200, ge=1, description="gate training steps on the experts' mixed data")
    lr: float = Field(5e-3, gt=0, description="learning rate of the gate training")
    k: int = Field(2, ge=1, description="experts per token while training (top-k)")
    balance: float = Field(0.01, ge=0, description="weight of the load-balancing loss")
    seed: int = Field(0, description="seed of the gates' random initialisation")


@register_router("learned")
class LearnedRouter(Router):
    """Learned token gates (X-LoRA, LoRAMoE, MixLoRA) over frozen experts, load-balanced."""

    options_model: ClassVar[type[OptionsModel]] = LearnedOptions
    options: LearnedOptions
    default_policy: ClassVar[Policy] = Policy("top_k", k=2, granularity="token")

    def build(self, env: RouterEnv) -> None:
        from moerge.route.gate_training import train_router_params

        torch.manual_seed(self.options.seed)
        for name, layer in env.handle.layers.items():
            self.set_tensor(module_key(name), torch.randn(layer.num_experts, layer.A.shape[-1]) * 0.01, trainable=True)
            self.set_present(name, layer.present)
        policy = Policy("top_k", k=self.options.k)
        aux: list[torch.Tensor] = []

        def weight_fn(module: str, x: torch.Tensor) -> torch.Tensor:
            scores = self.token_scores(module, x)
            weights = policy.select(scores)
            aux.append(load_balancing_loss(scores.masked_fill(torch.isinf(scores), -1e4), weights))
            return weights

        def balance() -> torch.Tensor:
            loss = self.options.balance * torch.stack(aux).mean()
            aux.clear()
            return loss

        mixed = [ex for expert in self.expert_names for ex in env.examples(expert)]
        params = [p for key, p in self.state.items() if not key.endswith("#present")]
        train_router_params(
            env, params, mixed, weight_fn, steps=self.options.steps, lr=self.options.lr, aux_loss=balance
        )
        for p in params:
            p.requires_grad_(False)

    def token_scores(self, module: str, x: torch.Tensor) -> torch.Tensor:
        key = module_key(module)
        scores = x.to(self.state[key].dtype) @ self.state[key].T
        return self.mask_missing(module, scores)
