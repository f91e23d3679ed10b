"""Logits only where they are needed.

The LM head of a small model is a large share of its compute: SmolLM2-135M projects every position
onto a 49k-word vocabulary. Training and scoring read the logits at a few positions (the answer
tokens, the prompt's last token), so asking the model for those positions alone saves most of it.
"""

from __future__ import annotations

import inspect
from functools import cache

import torch
import torch.nn.functional as F

from moerge.data.prompts import IGNORE_INDEX


@cache
def _forward_parameters(model_type: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_type.forward).parameters)


def forward_accepts(model, keyword: str) -> bool:
    """Whether the model's own forward (under a peft wrapper, the wrapped model's) takes `keyword`."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return keyword in _forward_parameters(type(inner))


def forward_at(model, keep: int | torch.Tensor, **inputs):
    """The model's output with logits only at sequence positions `keep` (a 1-D index tensor, or an
    int n ≥ 1: the last n), through transformers' `logits_to_keep` where the model has it, else by
    slicing the full logits."""
    if forward_accepts(model, "logits_to_keep"):
        return model(**inputs, logits_to_keep=keep)
    out = model(**inputs)
    out.logits = out.logits[:, -keep:] if isinstance(keep, int) else out.logits[:, keep]
    return out


def answer_token_nll(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood of the labelled tokens, shape (batch, kept positions), with
    0 where a row has no label, and the boolean mask of the counted tokens (same shape).

    Only positions that predict a label in some row go through the LM head: the same numbers as
    cross-entropy over the full logits, without projecting the prompt tokens onto the vocabulary.
    """
    targets = labels[:, 1:]
    positions = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    logits = forward_at(model, positions, input_ids=input_ids, attention_mask=attention_mask).logits
    kept = targets[:, positions]
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), kept.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(kept.shape)
    return nll, kept != IGNORE_INDEX


def answer_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over the labelled tokens (what `model(labels=...).loss` gives)."""
    nll, counted = answer_token_nll(model, input_ids, attention_mask, labels)
    return nll.sum() / counted.sum().clamp(min=1)
