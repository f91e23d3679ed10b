"""Sentence embeddings for example-level routers: the base model's mean hidden state, or MiniLM.

Both embed a prompt the way the routed model sees it, so centroids built from training inputs are
comparable with the prompts routed at inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from moerge.data.formats import PromptFormat
from moerge.data.prompts import pad_batch, prompt_ids, user_message
from moerge.data.task import Example
from moerge.errors import MoergeError

if TYPE_CHECKING:
    from moerge.route.stacked import StackedModel

EMBEDDERS = ("base", "minilm")
_MINILM: dict[str, Any] = {}


def encode_prompts(tokenizer: Any, examples: Sequence[Example], fmt: PromptFormat) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_batch([prompt_ids(tokenizer, ex, fmt) for ex in examples], tokenizer.pad_token_id)


class Embedder:
    """Embeds prompts given as examples in `fmt` (at build time) or as token ids (at inference)."""

    def __init__(
        self, kind: str, handle: StackedModel, tokenizer: Any, fmt: PromptFormat, batch_size: int = 16
    ) -> None:
        if kind not in EMBEDDERS:
            raise MoergeError(f"embedder {kind!r}: expected one of {', '.join(EMBEDDERS)}")
        self.kind, self.handle, self.tokenizer, self.batch_size = kind, handle, tokenizer, batch_size
        self.fmt = fmt

    def examples(self, examples: Sequence[Example]) -> torch.Tensor:
        if self.kind == "minilm":
            return _minilm([user_message(ex, self.fmt) for ex in examples], self.batch_size)
        parts = [
            self.ids(*encode_prompts(self.tokenizer, examples[i : i + self.batch_size], self.fmt))
            for i in range(0, len(examples), self.batch_size)
        ]
        return torch.cat(parts)

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.examples([Example(t, "") for t in texts])

    @torch.no_grad()
    def ids(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """[b, d] embedding of prompts given as ids (padding excluded)."""
        if self.kind == "minilm":
            texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
            return _minilm(texts, self.batch_size)
        mask = torch.ones_like(input_ids) if mask is None else mask
        with self.handle.experts_off():
            out = self.handle.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[-1].float()
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


@torch.no_grad()
def _minilm(texts: Sequence[str], batch_size: int) -> torch.Tensor:
    """all-MiniLM-L6-v2 mean-pooled embeddings; the model is loaded once, lazily."""
    if not _MINILM:
        from transformers import AutoModel, AutoTokenizer

        from moerge.models import resolve_base

        where = resolve_base("minilm-l6-v2")
        _MINILM["tok"] = AutoTokenizer.from_pretrained(where)
        _MINILM["model"] = AutoModel.from_pretrained(where, use_safetensors=True).eval()
    tok, model = _MINILM["tok"], _MINILM["model"]
    parts = []
    for i in range(0, len(texts), batch_size):
        enc = tok(
            list(texts[i : i + batch_size]),
            padding=True,
            truncation=True,
            max_length=256,
            return_tensors="pt",
        )
        hidden = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        parts.append((hidden * m).sum(1) / m.sum(1).clamp(min=1))
    return torch.cat(parts)
