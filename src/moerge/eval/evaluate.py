"""Scoring a model on a task split: rank classification for multiple choice, generation otherwise."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from moerge.data.prompts import answer_ids, prompt_ids
from moerge.data.task import Example, Task
from moerge.progress import progress_bar

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def evaluate_task(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    *,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy (mean score) on `split`, with the number of examples and how it was scored."""
    examples = task.split(split)[:limit] if limit else task.split(split)
    if not examples:
        return {"accuracy": None, "n": 0, "mode": "none"}
    show = progress and sys.stderr.isatty()
    if task.is_multiple_choice:
        scores = rank_classify(model, tokenizer, examples, batch_size=batch_size, progress=show)
        mode = "rank_classification"
    else:
        predictions = generate_answers(
            model, tokenizer, examples, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=show
        )
        scores = [task.scorer(p, ex) for p, ex in zip(predictions, examples, strict=True)]
        mode = "generation"
    return {"accuracy": sum(scores) / len(scores), "n": len(scores), "mode": mode, "scores": scores}


def _device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


def sequence_logprobs(model: PreTrainedModel, pairs: list[tuple[list[int], list[int]]], pad_id: int) -> list[float]:
    """Sum of log p(answer | prompt) for each (prompt_ids, answer_ids) pair, in one padded batch."""
    import torch

    width = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (p, a) in enumerate(pairs):
        seq = p + a
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    device = _device(model)
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    out = []
    for row, (p, a) in enumerate(pairs):
        positions = torch.arange(len(p) - 1, len(p) + len(a) - 1, device=device)
        targets = torch.tensor(a, device=device)
        out.append(float(logprobs[row, positions, targets].sum()))
    return out


def rank_classify(model, tokenizer, examples: list[Example], *, batch_size: int, progress: bool) -> list[float]:
    """1.0 where the highest-likelihood choice is the target, for each example."""
    pairs = [
        (prompt_ids(tokenizer, ex), answer_ids(tokenizer, ex, choice)) for ex in examples for choice in ex.choices or ()
    ]
    scores: list[float] = []
    with progress_bar(enabled=progress) as bar:
        job = bar.add_task("eval", total=len(pairs), info="rank classification")
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            scores.extend(sequence_logprobs(model, chunk, tokenizer.pad_token_id))
            bar.update(job, advance=len(chunk))
    result, offset = [], 0
    for ex in examples:
        choices = list(ex.choices or ())
        mine = scores[offset : offset + len(choices)]
        offset += len(choices)
        result.append(float(choices[mine.index(max(mine))] == ex.target))
    return result


def generate_answers(
    model, tokenizer, examples: list[Example], *, batch_size: int, max_new_tokens: int | None, progress: bool
) -> list[str]:
    """Greedy answers, left-padded batches; stops at the end-of-turn token."""
    import torch

    if max_new_tokens is None:
        longest = max(len(answer_ids(tokenizer, ex, ex.target)) for ex in examples)
        max_new_tokens = min(64, longest + 8)
    device = _device(model)
    answers: list[str] = []
    with progress_bar(enabled=progress) as bar:
        job = bar.add_task("eval", total=len(examples), info="generation")
        for start in range(0, len(examples), batch_size):
            chunk = [prompt_ids(tokenizer, ex) for ex in examples[start : start + batch_size]]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, p in enumerate(chunk):
                ids[row, width - len(p) :] = torch.tensor(p)
                mask[row, width - len(p) :] = 1
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            answers.extend(tokenizer.batch_decode(out[:, width:], skip_special_tokens=True))
            bar.update(job, advance=len(chunk))
    return answers
