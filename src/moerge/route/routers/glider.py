"""GLIDER: Phatgoose's local per-token scores plus a global score shared by all layers:
α × cosine between the query task's description embedding and each expert's description embedding.

Describers (option `describer`): "examples" (default: the mean embedding of a few of the expert's
training prompts; the query side embeds the prompt itself), "text" (option `descriptions`:
{expert: text}), "chat" (a chat model — option `chat_model`, default the base — writes a one-sentence
description from a few examples). At inference `routing_context(task_descriptions=[...])` gives the
query descriptions; otherwise each prompt's own embedding is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moerge.data.task import Example
from moerge.errors import MoergeError
from moerge.route.router import RouterEnv, register_router
from moerge.route.routers.centroid import EmbeddingRouter
from moerge.route.routers.phatgoose import PhatgooseRouter
from moerge.route.stacked import Step

DESCRIBERS = ("examples", "text", "chat")
DESCRIBE_PROMPT = "Here are examples of a task:\n{examples}\nDescribe this task in one sentence."


def describe_with_chat_model(env: RouterEnv, examples: list[Example], model_path: str | None) -> str:
    """One generated sentence describing the task shown by `examples` (greedy, short)."""
    from moerge.data.prompts import pad_batch, prompt_ids

    shown = "\n".join(f"- {ex.input} -> {ex.target}" for ex in examples[:4])
    query = Example(DESCRIBE_PROMPT.format(examples=shown), "")
    if model_path:
        from moerge.models import load_base

        model, tokenizer = load_base(model_path)
        context = torch.no_grad()
    else:
        model, tokenizer, context = env.handle.model, env.tokenizer, env.handle.experts_off()
    ids, mask = pad_batch([prompt_ids(tokenizer, query)], tokenizer.pad_token_id)
    with context, torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


@register_router("glider")
class GliderRouter(PhatgooseRouter, EmbeddingRouter):
    """Options: those of phatgoose, plus `alpha` (default 1.0), `describer`, `descriptions`,
    `chat_model`, `embedder` ("base"/"minilm"), `describe_examples` (default 8)."""

    def build(self, env: RouterEnv) -> None:
        super().build(env)
        self.bind(env)
        describer = self.options.get("describer", "examples")
        if describer not in DESCRIBERS:
            raise MoergeError(f"glider: describer {describer!r}: expected one of {', '.join(DESCRIBERS)}")
        embed = self.embedder()
        n = int(self.options.get("describe_examples", 8))
        if describer == "examples":
            rows = [embed.examples(env.examples(name)[:n]).mean(0) for name in self.expert_names]
            self.set_tensor("descriptions", F.normalize(torch.stack(rows), dim=-1))
            return
        if describer == "text":
            texts = self.options.get("descriptions") or {}
            missing = [name for name in self.expert_names if name not in texts]
            if missing:
                raise MoergeError(f"glider: describer 'text' needs descriptions for experts {', '.join(missing)}")
        else:
            chat_model = self.options.get("chat_model")
            texts = {
                name: describe_with_chat_model(env, env.examples(name)[:n], chat_model) for name in self.expert_names
            }
            self.options["descriptions"] = texts
        self.set_tensor("descriptions", F.normalize(embed.texts([texts[n] for n in self.expert_names]), dim=-1))

    def example_scores(self, step: Step) -> torch.Tensor:
        described = step.context.get("task_descriptions")
        query = self.embedder().texts(described) if described else self.embed_step(step)
        cosine = F.normalize(query, dim=-1) @ self.state["descriptions"].T
        return float(self.options.get("alpha", 1.0)) * cosine
