"""Arrow (training-free): per module, an expert's prototype is the top right-singular vector of B·A;
a token's score for the expert is |prototype · x|, then top-k softmax."""

from __future__ import annotations

from typing import ClassVar

import torch

from moerge.route.policies import Policy
from moerge.route.router import Router, RouterEnv, module_key, register_router


def lora_prototype(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Top right-singular vector of B·A [out, in] from the small factors, never forming B·A.

    With A^T = Q_a R_a and B = Q_b R_b: B·A = Q_b (R_b R_a^T) Q_a^T, so its right-singular vectors are
    Q_a times those of the r×r core. An all-zero expert gets a zero prototype.
    """
    q_a, r_a = torch.linalg.qr(a.double().T)
    _, r_b = torch.linalg.qr(b.double())
    _, _, vh = torch.linalg.svd(r_b @ r_a.T)
    return (q_a @ vh[0]).to(a.dtype)


@register_router("arrow")
class ArrowRouter(Router):
    """Arrow (no training): a token scores |x · top right-singular vector of B·A| per expert.

    Takes no options. Prototypes are cached as expert artifacts (kind "arrow") when a library is given.
    """

    default_policy: ClassVar[Policy] = Policy("top_k", k=2, granularity="token")

    def build(self, env: RouterEnv) -> None:
        from moerge.route.artifacts import cached_per_expert

        def compute(k: int) -> dict[str, torch.Tensor]:
            return {
                name: lora_prototype(layer.A[k].float(), layer.B[k].float())
                for name, layer in env.handle.layers.items()
                if layer.present[k]
            }

        per_expert = cached_per_expert(env, "arrow", {"method": "top_right_singular_vector"}, compute)
        for name, layer in env.handle.layers.items():
            protos = torch.zeros(layer.num_experts, layer.A.shape[-1])
            for k, tensors in enumerate(per_expert):
                if name in tensors:
                    protos[k] = tensors[name]
            self.set_tensor(module_key(name), protos)
            self.set_present(name, layer.present)

    def token_scores(self, module: str, x: torch.Tensor) -> torch.Tensor:
        key = module_key(module)
        scores = (x.float() @ self.state[key].T).abs()
        return self.mask_missing(module, scores)
