"""Classifier: logistic regression on prompt embeddings of the experts' training inputs predicts the
expert; its log-probabilities are the routing scores."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from moerge.route.policies import Policy
from moerge.route.router import OptionsModel, RouterEnv, register_router
from moerge.route.routers.centroid import EmbedderOptions, EmbeddingRouter
from moerge.route.stacked import Step


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, classes: int, *, l2: float, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression with L-BFGS; returns (weight [C, d], bias [C])."""
    weight = torch.zeros(classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


class ClassifierOptions(EmbedderOptions):
    l2: float = Field(1e-3, ge=0, description="L2 penalty on the logistic regression's weights")
    iters: int = Field(100, ge=1, description="L-BFGS iterations fitting the logistic regression")


@register_router("classifier")
class ClassifierRouter(EmbeddingRouter):
    """Classifier: logistic regression on prompt embeddings predicts the expert.

    Its log-probabilities are the scores.
    """

    options_model: ClassVar[type[OptionsModel]] = ClassifierOptions
    options: ClassifierOptions
    default_policy: ClassVar[Policy] = Policy("top_k", k=1, granularity="example")

    def build(self, env: RouterEnv) -> None:
        self.bind(env)
        embed = self.embedder()
        feats, labels = [], []
        for k, name in enumerate(self.expert_names):
            e = embed.examples(env.examples(name))
            feats.append(e)
            labels += [k] * len(e)
        x = torch.cat(feats)
        mean, std = x.mean(0), x.std(0) + 1e-6
        weight, bias = fit_logistic(
            (x - mean) / std,
            torch.tensor(labels),
            self.num_experts,
            l2=self.options.l2,
            iters=self.options.iters,
        )
        for key, value in {"mean": mean, "std": std, "weight": weight, "bias": bias}.items():
            self.set_tensor(key, value)

    def example_scores(self, step: Step) -> torch.Tensor:
        x = (self.embed_step(step) - self.state["mean"]) / self.state["std"]
        return torch.log_softmax(x @ self.state["weight"].T + self.state["bias"], dim=-1)
