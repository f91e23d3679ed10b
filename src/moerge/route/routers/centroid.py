"""Centroid retrieval: cosine between a prompt's embedding and each expert's training-data centroid."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from moerge.route.embed import EMBEDDERS, Embedder
from moerge.route.policies import Policy
from moerge.route.router import OptionsModel, Router, RouterEnv, register_router
from moerge.route.stacked import Step


class EmbedderOptions(OptionsModel):
    embedder: Literal[EMBEDDERS] = Field(  # type: ignore[valid-type]  # the names `Embedder` accepts
        "base",
        description="prompt embedder: base (the base model's mean last hidden state) or minilm",
    )


class EmbeddingRouter(Router):
    """Shared by example-level routers that embed prompts (their options extend `EmbedderOptions`)."""

    options_model: ClassVar[type[OptionsModel]] = EmbedderOptions
    options: EmbedderOptions

    def embedder(self) -> Embedder:
        return Embedder(self.options.embedder, self.env.handle, self.env.tokenizer, self.env.prompt_format)

    def embed_step(self, step: Step) -> torch.Tensor:
        return self.embedder().ids(step.input_ids, step.mask)


@register_router("centroid")
class CentroidRouter(EmbeddingRouter):
    """Centroid retrieval: cosine of the prompt's embedding with each expert's data centroid.

    Scores are cosines in [-1, 1]; the default policy sharpens them with temperature 0.05.
    """

    default_policy: ClassVar[Policy] = Policy("top_k", k=1, granularity="example", temperature=0.05)

    def build(self, env: RouterEnv) -> None:
        self.bind(env)
        embed = self.embedder()
        centroids = torch.stack([embed.examples(env.examples(name)).mean(0) for name in self.expert_names])
        self.set_tensor("centroids", F.normalize(centroids, dim=-1))

    def example_scores(self, step: Step) -> torch.Tensor:
        return F.normalize(self.embed_step(step), dim=-1) @ self.state["centroids"].T
