"""Scoring a model on a task split: rank classification for multiple choice, generation otherwise."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from moerge.data.formats import PromptFormat
from moerge.data.prompts import answer_ids, choice_ids, pad_batch, prompt_ids
from moerge.data.task import Example, Task
from moerge.progress import progress_bar

BatchContext = Callable[[int], AbstractContextManager]

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def evaluate_task(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    *,
    fmt: PromptFormat,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    progress: bool = True,
    batch_context: BatchContext | None = None,
    keep_predictions: bool = False,
) -> dict[str, Any]:
    """Accuracy (mean score) on `split` with examples rendered in `fmt`, with the number of examples
    and how it was scored.

    `batch_context(n)` wraps every model call on n examples (routers that need task labels use it).
    `keep_predictions`: also return `predictions`, one row per example (see `prediction_rows`); off by
    default, so the results that callers cache stay small.
    """
    examples = task.split(split)[:limit] if limit else task.split(split)
    if not examples:
        return {"accuracy": None, "n": 0, "mode": "none"}
    show = progress and sys.stderr.isatty()
    recorder = ExpertRecorder(model, batch_context) if keep_predictions else None
    context = recorder.context if recorder else batch_context
    logprobs: list[list[float]] | None = None
    outputs: list[str] | None = None
    if task.is_multiple_choice:
        logprobs = choice_logprobs(
            model, tokenizer, examples, fmt=fmt, batch_size=batch_size, progress=show, batch_context=context
        )
        scores = [float(_chosen(ex, s) == ex.target) for ex, s in zip(examples, logprobs, strict=True)]
        mode = "rank_classification"
    else:
        outputs = generate_answers(
            model,
            tokenizer,
            examples,
            fmt=fmt,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            progress=show,
            batch_context=context,
        )
        scores = [task.scorer(p, ex) for p, ex in zip(outputs, examples, strict=True)]
        mode = "generation"
    result = {
        "accuracy": sum(scores) / len(scores),
        "n": len(scores),
        "mode": mode,
        "prompt_format": fmt.name,
        "scores": scores,
    }
    if recorder is not None:
        experts = recorder.rows if recorder.active else None
        result["predictions"] = prediction_rows(tokenizer, examples, fmt, scores, logprobs, outputs, experts)
    return result


def _chosen(example: Example, logprobs: list[float]) -> str:
    """The choice rank classification picks: the highest log-likelihood (the first one on a tie)."""
    return list(example.choices or ())[logprobs.index(max(logprobs))]


def prediction_rows(
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    fmt: PromptFormat,
    scores: list[float],
    logprobs: list[list[float]] | None,
    outputs: list[str] | None,
    experts: list[dict[str, float] | None] | None,
) -> list[dict[str, Any]]:
    """One JSON-ready row per example: `index` (position in the split), `id` (the example's own
    `meta["id"]`, else the index), `input` (the example's question), `prompt` (the exact text the model
    read: `input` in the prompt format, special tokens included), `target`, `score` and `correct`
    (score == 1); then `choices`, `choice_logprobs` and `chosen` under rank classification or `output`
    under generation; and `experts` for a routed model (mean routing weight per expert over the prompt's
    tokens and the layers, heaviest first, zero weights left out; None for a batch nothing was recorded in)."""
    rows = []
    for i, (ex, score) in enumerate(zip(examples, scores, strict=True)):
        row: dict[str, Any] = {
            "index": i,
            "id": ex.meta.get("id", i),
            "input": ex.input,
            "prompt": tokenizer.decode(prompt_ids(tokenizer, ex, fmt)),
            "target": ex.target,
            "score": score,
            "correct": score == 1.0,
        }
        if logprobs is not None:
            row.update(choices=list(ex.choices or ()), choice_logprobs=logprobs[i], chosen=_chosen(ex, logprobs[i]))
        if outputs is not None:
            row["output"] = outputs[i]
        if experts is not None:
            row["experts"] = experts[i]
        rows.append(row)
    return rows


class ExpertRecorder:
    """Which experts a routed model used on each example: wraps each batch's model calls, records the
    routing weights of the prompt's forward pass (the one routing decisions are made on) and keeps one
    {expert: mean weight} per example. Inactive (records nothing) on a model without a router.

    Reads the router through the model's `moerge_routing` handle (its `routing.start_recording()` and
    `records`, as `moerge route explain` and the server do), so this layer imports nothing from routing.
    """

    def __init__(self, model: Any, inner: BatchContext | None) -> None:
        self.routing = getattr(getattr(model, "moerge_routing", None), "routing", None)
        self.inner = inner
        self.rows: list[dict[str, float] | None] = []

    @property
    def active(self) -> bool:
        return self.routing is not None

    @contextmanager
    def context(self, n: int) -> Iterator[None]:
        with _context(self.inner, n):
            if self.routing is None:
                yield
                return
            self.routing.start_recording()
            try:
                yield
            finally:
                self.rows.extend(self._collect(n))

    def _collect(self, n: int) -> list[dict[str, float] | None]:
        """Per example: weights [n, K] of each module's prefill, averaged over modules."""
        import torch

        records, self.routing.records = self.routing.records or {}, None
        per_module = [torch.cat(rows) for rows in records.values() if rows]
        if not per_module or any(w.shape[0] != n for w in per_module):
            return [None] * n  # nothing recorded for this batch, or not one row per example
        names = self.routing.handle.expert_names
        return [_used(names, row) for row in torch.stack(per_module).mean(0).tolist()]


def _used(names: list[str], weights: list[float]) -> dict[str, float]:
    """{expert: weight} rounded to 4 places, heaviest first, experts that got (almost) nothing left out."""
    rounded = sorted(((name, round(w, 4)) for name, w in zip(names, weights, strict=True)), key=lambda x: -x[1])
    return {name: w for name, w in rounded if w > 0}


def _context(batch_context: BatchContext | None, n: int) -> AbstractContextManager:
    return batch_context(n) if batch_context else nullcontext()


def _device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


def choice_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    *,
    fmt: PromptFormat,
    batch_size: int = 16,
    progress: bool = False,
    batch_context: BatchContext | None = None,
) -> list[list[float]]:
    """log p(choice | prompt) summed over the choice's tokens, for every choice of every example.

    Each prompt runs once; every choice then continues from the prompt's KV cache (cropped back
    after each choice), so cost grows with the choices' length, not with prompt × choices. The batch
    size never changes between the prompt and its choices, so routers that decide on the prompt
    keep their per-example decisions.
    """
    out: list[list[float]] = []
    with progress_bar(enabled=progress) as bar:
        job = bar.add_task("eval", total=len(examples), info="rank classification")
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            with _context(batch_context, len(chunk)):
                out.extend(_chunk_choice_logprobs(model, tokenizer, chunk, fmt))
            bar.update(job, advance=len(chunk))
    return out


def _chunk_choice_logprobs(model, tokenizer, chunk: list[Example], fmt: PromptFormat) -> list[list[float]]:
    import torch
    from transformers import DynamicCache

    from moerge.models.logits import forward_accepts, forward_at

    device = _device(model)
    ids, mask = pad_batch([prompt_ids(tokenizer, ex, fmt) for ex in chunk], tokenizer.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()  # filled in place by the prefill, cropped back after each choice
    # transformers 5 names it `cache` (`past_key_values` is deprecated there and goes in 5.40)
    cache_kw = {"cache" if forward_accepts(model, "cache") else "past_key_values": cache}
    with torch.no_grad():
        prefill = forward_at(
            model, 1, input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache_kw
        )
    first = torch.log_softmax(prefill.logits[:, -1].float(), dim=-1)
    lengths = mask.sum(-1, keepdim=True)
    choices = [[choice_ids(tokenizer, ex, c, fmt) for c in ex.choices or ()] for ex in chunk]
    scores: list[list[float]] = [[] for _ in chunk]
    for k in range(max(len(c) for c in choices)):
        # Examples with fewer choices repeat their first one here; its score is not kept.
        tokens = [c[k] if k < len(c) else c[0] for c in choices]
        total = first.gather(1, torch.tensor([t[0] for t in tokens], device=device)[:, None]).squeeze(1)
        longest = max(len(t) for t in tokens)
        if longest > 1:
            cids, cmask = pad_batch(tokens, tokenizer.pad_token_id, left=False)
            cids, cmask = cids.to(device), cmask.to(device)
            with torch.no_grad():
                cont = model(
                    input_ids=cids,
                    attention_mask=torch.cat([mask, cmask], dim=1),
                    position_ids=lengths + torch.arange(longest, device=device),
                    use_cache=True,
                    **cache_kw,
                )
            logprobs = torch.log_softmax(cont.logits[:, :-1].float(), dim=-1)
            picked = logprobs.gather(2, cids[:, 1:, None]).squeeze(2) * cmask[:, 1:]
            total = total + picked.sum(1)
            cache.crop(-longest)  # back to the prompt alone
        for i, c in enumerate(choices):
            if k < len(c):
                scores[i].append(float(total[i]))
    return scores


def rank_classify(
    model,
    tokenizer,
    examples: list[Example],
    *,
    fmt: PromptFormat,
    batch_size: int,
    progress: bool,
    batch_context: BatchContext | None = None,
) -> list[float]:
    """1.0 where the highest-likelihood choice is the target, for each example."""
    result = []
    all_scores = choice_logprobs(
        model, tokenizer, examples, fmt=fmt, batch_size=batch_size, progress=progress, batch_context=batch_context
    )
    for ex, scores in zip(examples, all_scores, strict=True):
        result.append(float(_chosen(ex, scores) == ex.target))
    return result


def generate_answers(
    model,
    tokenizer,
    examples: list[Example],
    *,
    fmt: PromptFormat,
    batch_size: int,
    max_new_tokens: int | None,
    progress: bool,
    batch_context: BatchContext | None = None,
) -> list[str]:
    """Greedy answers, left-padded batches; stops at the end-of-turn token."""
    import torch

    if max_new_tokens is None:
        longest = max(len(answer_ids(tokenizer, ex, ex.target, fmt)) for ex in examples)
        max_new_tokens = min(64, longest + 8)
    device = _device(model)
    answers: list[str] = []
    with progress_bar(enabled=progress) as bar:
        job = bar.add_task("eval", total=len(examples), info="generation")
        for start in range(0, len(examples), batch_size):
            chunk = [prompt_ids(tokenizer, ex, fmt) for ex in examples[start : start + batch_size]]
            ids, mask = pad_batch(chunk, tokenizer.pad_token_id)
            width = ids.shape[1]
            with torch.no_grad(), _context(batch_context, len(chunk)):
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
