"""Centroid retrieval: cosine between a prompt's embedding and each expert's training-data centroid."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from moerge.route.embed import Embedder
from moerge.route.router import Router, RouterEnv, register_router
from moerge.route.stacked import Step


class EmbeddingRouter(Router):
    """Shared by example-level routers that embed prompts. Option `embedder`: "base" (the base model's
    mean last hidden state, default) or "minilm" (all-MiniLM-L6-v2)."""

    def embedder(self) -> Embedder:
        return Embedder(self.options.get("embedder", "base"), self.env.handle, self.env.tokenizer)

    def embed_step(self, step: Step) -> torch.Tensor:
        return self.embedder().ids(step.input_ids, step.mask)


@register_router("centroid")
class CentroidRouter(EmbeddingRouter):
    """Scores are cosines in [-1, 1]; the default policy sharpens them with temperature 0.05."""

    default_policy: ClassVar[dict[str, Any]] = {
        "name": "top_k",
        "k": 1,
        "granularity": "example",
        "temperature": 0.05,
    }

    def build(self, env: RouterEnv) -> None:
        self.bind(env)
        embed = self.embedder()
        centroids = torch.stack([embed.examples(env.examples(name)).mean(0) for name in self.expert_names])
        self.set_tensor("centroids", F.normalize(centroids, dim=-1))

    def example_scores(self, step: Step) -> torch.Tensor:
        return F.normalize(self.embed_step(step), dim=-1) @ self.state["centroids"].T
