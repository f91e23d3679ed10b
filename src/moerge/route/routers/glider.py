"""GLIDER: Phatgoose's local per-token scores plus a global score shared by all layers:
α × cosine between the query task's description embedding and each expert's description embedding.

Describers (option `describer`): "examples" (default: the mean embedding of a few of the expert's
training prompts; the query side embeds the prompt itself), "text" (option `descriptions`:
{expert: text}), "chat" (a chat model — option `chat_model`, default the base — writes a one-sentence
description from a few examples; they are kept in the router's `derived["descriptions"]`). At inference
`routing_context(task_descriptions=[...])` gives the query descriptions; otherwise each prompt's own
embedding is used.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from moerge.data.task import Example
from moerge.errors import MoergeError
from moerge.route.router import OptionsModel, RouterEnv, register_router
from moerge.route.routers.centroid import EmbedderOptions, EmbeddingRouter
from moerge.route.routers.phatgoose import PhatgooseOptions, PhatgooseRouter
from moerge.route.stacked import Step

DESCRIBE_PROMPT = "Here are examples of a task:\n{examples}\nDescribe this task in one sentence."


class GliderOptions(PhatgooseOptions, EmbedderOptions):
    alpha: float = Field(1.0, ge=0, description="weight α of the global (task description) score")
    describer: Literal["examples", "text", "chat"] = Field(
        "examples",
        description="how experts are described: examples (their training prompts' mean embedding), "
        "text (the descriptions option) or chat (a chat model writes them)",
    )
    descriptions: dict[str, str] | None = Field(None, description="expert name → description, for describer text")
    chat_model: str | None = Field(
        None, description="model that writes the descriptions for describer chat; the base model when unset"
    )
    describe_examples: int = Field(8, ge=1, description="training examples per expert used to describe it")


def describe_with_chat_model(env: RouterEnv, examples: list[Example], model_path: str | None) -> str:
    """One generated sentence describing the task shown by `examples` (greedy, short)."""
    from moerge.data.formats import MOERGE
    from moerge.data.prompts import pad_batch, prompt_ids

    shown = "\n".join(f"- {ex.input} -> {ex.target}" for ex in examples[:4])
    query = Example(DESCRIBE_PROMPT.format(examples=shown), "")
    if model_path:
        from moerge.models import load_base

        model, tokenizer = load_base(model_path)
        context = torch.no_grad()
    else:
        model, tokenizer, context = env.handle.model, env.tokenizer, env.handle.experts_off()
    ids, mask = pad_batch([prompt_ids(tokenizer, query, MOERGE)], tokenizer.pad_token_id)  # moerge's own question
    with context, torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


@register_router("glider")
class GliderRouter(PhatgooseRouter, EmbeddingRouter):
    """GLIDER: Phatgoose token scores + α × cosine of task and expert description embeddings."""

    options_model: ClassVar[type[OptionsModel]] = GliderOptions
    options: GliderOptions

    def build(self, env: RouterEnv) -> None:
        super().build(env)
        self.bind(env)
        embed = self.embedder()
        n = self.options.describe_examples
        if self.options.describer == "examples":
            rows = [embed.examples(env.examples(name)[:n]).mean(0) for name in self.expert_names]
            self.set_tensor("descriptions", F.normalize(torch.stack(rows), dim=-1))
            return
        texts = self._given_descriptions() if self.options.describer == "text" else self._chat_descriptions(env)
        self.set_tensor("descriptions", F.normalize(embed.texts([texts[n] for n in self.expert_names]), dim=-1))

    def _given_descriptions(self) -> dict[str, str]:
        texts = self.options.descriptions or {}
        missing = [name for name in self.expert_names if name not in texts]
        if missing:
            raise MoergeError(f"glider: describer 'text' needs descriptions for experts {', '.join(missing)}")
        return texts

    def _chat_descriptions(self, env: RouterEnv) -> dict[str, str]:
        """Written by the chat model and kept in `derived` (saved in config.json), not in the options."""
        n, chat_model = self.options.describe_examples, self.options.chat_model
        texts = {name: describe_with_chat_model(env, env.examples(name)[:n], chat_model) for name in self.expert_names}
        self.derived["descriptions"] = texts
        return texts

    def example_scores(self, step: Step) -> torch.Tensor:
        described = step.context.get("task_descriptions")
        query = self.embedder().texts(described) if described else self.embed_step(step)
        cosine = F.normalize(query, dim=-1) @ self.state["descriptions"].T
        return self.options.alpha * cosine
