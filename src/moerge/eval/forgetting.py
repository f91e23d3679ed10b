"""Forgetting: how much of the base model's general ability survives a strategy.

Measured as the plain language-model loss on a general text probe (raw text, no chat template: the
base's own pre-training view) — lower is better, so forgetting shows as a loss increase.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moerge.data.prompts import pad_batch
from moerge.data.task import Example

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def probe_texts(examples: list[Example]) -> list[str]:
    """A task's examples as running text: the question followed by its answer."""
    return [f"{ex.input.strip()}\n{ex.target.strip()}" for ex in examples]


def text_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    *,
    batch_size: int = 8,
    max_length: int = 256,
) -> float:
    """Mean per-token negative log-likelihood of `texts` (every token but the first of each text)."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        rows = [
            tokenizer(t, add_special_tokens=True)["input_ids"][:max_length] for t in texts[start : start + batch_size]
        ]
        ids, mask = pad_batch(rows, tokenizer.pad_token_id, left=False)
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).view(len(rows), -1)
        keep = mask[:, 1:].float()
        total += float((nll * keep).sum())
        count += int(keep.sum())
    return total / max(count, 1)
