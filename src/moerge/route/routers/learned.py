"""Learned token gates (the X-LoRA / LoRAMoE / MixLoRA family): per module a linear gate over the frozen
experts, trained on their mixed data with a load-balancing loss so every expert gets used."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from moerge.route.policies import Policy
from moerge.route.router import Router, RouterEnv, module_key, register_router


def load_balancing_loss(scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer style K·Σ_k f_k·P_k: f = share of tokens routed to k, P = mean probability."""
    probs = torch.softmax(scores.float(), -1).flatten(0, -2)
    routed = (weights > 0).float().flatten(0, -2)
    return scores.shape[-1] * (routed.mean(0) * probs.mean(0)).sum()


@register_router("learned")
class LearnedRouter(Router):
    """Options: `steps` (default 200), `lr` (default 5e-3), `k` used in training (default 2),
    `balance` (load-balancing loss weight, default 0.01)."""

    default_policy: ClassVar[dict[str, Any]] = {"name": "top_k", "k": 2, "granularity": "token"}

    def build(self, env: RouterEnv) -> None:
        from moerge.route.gate_training import train_router_params

        torch.manual_seed(int(self.options.get("seed", 0)))
        for name, layer in env.handle.layers.items():
            self.set_tensor(module_key(name), torch.randn(layer.num_experts, layer.A.shape[-1]) * 0.01, trainable=True)
            self.set_present(name, layer.present)
        policy = Policy("top_k", k=int(self.options.get("k", 2)))
        aux: list[torch.Tensor] = []

        def weight_fn(module: str, x: torch.Tensor) -> torch.Tensor:
            scores = self.token_scores(module, x)
            weights = policy.select(scores)
            aux.append(load_balancing_loss(scores.masked_fill(torch.isinf(scores), -1e4), weights))
            return weights

        def balance() -> torch.Tensor:
            loss = float(self.options.get("balance", 0.01)) * torch.stack(aux).mean()
            aux.clear()
            return loss

        mixed = [ex for expert in self.expert_names for ex in env.examples(expert)]
        params = [p for key, p in self.state.items() if not key.endswith("#present")]
        steps, lr = int(self.options.get("steps", 200)), float(self.options.get("lr", 5e-3))
        train_router_params(env, params, mixed, weight_fn, steps=steps, lr=lr, aux_loss=balance)
        for p in params:
            p.requires_grad_(False)

    def token_scores(self, module: str, x: torch.Tensor) -> torch.Tensor:
        key = module_key(module)
        scores = x.to(self.state[key].dtype) @ self.state[key].T
        return self.mask_missing(module, scores)
