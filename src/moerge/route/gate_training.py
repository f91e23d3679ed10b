"""A short training loop for router parameters with the base and the experts frozen (Phatgoose gates,
learned token gates). The model's own weights get no gradients; only `params` move."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
from torch import nn

from moerge.data.formats import PromptFormat
from moerge.data.prompts import collate, encode_for_training
from moerge.data.task import Example
from moerge.models.logits import answer_loss
from moerge.route.router import RouterEnv
from moerge.route.stacked import WeightFn


def training_batches(
    tokenizer: object, examples: Sequence[Example], fmt: PromptFormat, *, batch_size: int, max_length: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask, labels) batches in `fmt`, right-padded, loss on the answer tokens only."""
    order = list(examples)
    random.Random(seed).shuffle(order)
    out = []
    for i in range(0, len(order), batch_size):
        encoded = [encode_for_training(tokenizer, ex, max_length, fmt) for ex in order[i : i + batch_size]]
        batch = collate(encoded, tokenizer.pad_token_id)
        out.append((batch["input_ids"], batch["attention_mask"], batch["labels"]))
    return out


def train_router_params(
    env: RouterEnv,
    params: Sequence[nn.Parameter],
    examples: Sequence[Example],
    weight_fn: WeightFn,
    *,
    steps: int,
    lr: float,
    aux_loss: Callable[[], torch.Tensor | None] = lambda: None,
    batch_size: int = 8,
    max_length: int = 128,
    seed: int = 0,
) -> list[float]:
    """Minimise the LM loss (+ `aux_loss()`, read after each forward) over `params`; returns losses.

    The model stays in eval mode (no dropout): only the router parameters are being fitted.
    """
    handle, model = env.handle, env.handle.model
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    batches = training_batches(
        env.tokenizer, examples, env.prompt_format, batch_size=batch_size, max_length=max_length, seed=seed
    )
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    handle.set_weight_fn(weight_fn)
    losses = []
    try:
        for step in range(steps):
            ids, mask, labels = batches[step % len(batches)]
            loss = answer_loss(model, ids, mask, labels)
            extra = aux_loss()
            if extra is not None:
                loss = loss + extra
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        handle.set_weight_fn(None)
        for p in frozen:
            p.requires_grad_(True)
    return losses
