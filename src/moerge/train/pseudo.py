"""Pseudo-labelling for self-training: a teacher labels a pool of inputs, keeping its confident answers.

Confidence is, for multiple choice, the softmax over the choices' answer log-likelihoods (the
probability of the picked choice); for free generation, the mean probability of the greedy answer's
tokens (end token included).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moerge.data.formats import PromptFormat
from moerge.data.prompts import answer_ids, pad_batch, prompt_ids
from moerge.data.task import Example, Task
from moerge.errors import MoergeError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def read_pool(spec: str, *, seed: int = 0) -> list[Example]:
    """Inputs to label: lines of a .txt, rows of a .jsonl (`input`, or `text`), or every example of a task.

    A pool row's `target`, when present, is kept (not shown to the teacher) to measure the pseudo
    labels' accuracy.
    """
    path = Path(spec)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise MoergeError(f"{spec}: unlabelled pool file not found")
        return [Example(line.strip(), "") for line in path.read_text().splitlines() if line.strip()]
    if path.suffix.lower() == ".jsonl" and path.is_file():
        return [_pool_row(row, f"{spec}:{n}") for n, row in _jsonl(path)]
    from moerge.data.loaders import load_task

    task = load_task(spec, seed=seed)
    return [*task.train, *task.validation, *task.test]


def _jsonl(path: Path) -> list[tuple[int, Any]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise MoergeError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
    return rows


def _pool_row(row: Any, where: str) -> Example:
    text = row.get("input", row.get("text")) if isinstance(row, dict) else None
    if not isinstance(text, str):
        raise MoergeError(f"{where}: expected an object with a string field 'input' (or 'text')")
    choices = row.get("choices")
    return Example(text, str(row.get("target", "")), tuple(choices) if choices else None)


def with_choices(pool: list[Example], labelled: Task) -> list[Example]:
    """Give pool inputs the labelled task's choices when it is multiple choice with one shared choice set."""
    if not labelled.is_multiple_choice or all(ex.choices for ex in pool):
        return pool
    sets = {ex.choices for ex in labelled.train}
    if len(sets) != 1:
        raise MoergeError(
            f"{labelled.source}: multiple-choice task with varying choices: pool rows need their own 'choices'"
        )
    shared = next(iter(sets))
    return [ex if ex.choices else replace(ex, choices=shared) for ex in pool]


def answer_token_logprobs(
    model: PreTrainedModel, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 16
) -> list[list[float]]:
    """log p(token | prefix) of each answer token, for (prompt_ids, answer_ids) pairs."""
    import torch

    from moerge.models.logits import forward_at

    device = next(model.parameters()).device
    out: list[list[float]] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        ids, mask = pad_batch([p + a for p, a in chunk], pad_id, left=False)
        wanted = sorted({i for p, a in chunk for i in range(len(p) - 1, len(p) + len(a) - 1)})
        column = {position: j for j, position in enumerate(wanted)}
        keep = torch.tensor(wanted, device=device)
        with torch.no_grad():
            logits = forward_at(model, keep, input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for row, (p, a) in enumerate(chunk):
            columns = torch.tensor([column[i] for i in range(len(p) - 1, len(p) + len(a) - 1)], device=device)
            out.append(logprobs[row, columns, torch.tensor(a, device=device)].tolist())
    return out


def label_choices(model, tokenizer, pool: list[Example], batch_size: int, fmt: PromptFormat) -> list[tuple[str, float]]:
    """(picked choice, its softmax probability over the choices) per example."""
    import torch

    from moerge.eval.evaluate import choice_logprobs

    out = []
    for ex, scores in zip(pool, choice_logprobs(model, tokenizer, pool, fmt=fmt, batch_size=batch_size), strict=True):
        probs = torch.softmax(torch.tensor(scores), dim=0)
        best = int(probs.argmax())
        out.append((list(ex.choices or ())[best], float(probs[best])))
    return out


def label_generation(
    model, tokenizer, pool: list[Example], batch_size: int, max_new_tokens: int, fmt: PromptFormat
) -> list[tuple[str, float]]:
    """(greedy answer's first line, mean probability of its tokens) per example."""
    from moerge.eval.evaluate import generate_answers

    texts = generate_answers(
        model, tokenizer, pool, fmt=fmt, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=False
    )
    answers = [t.strip().split("\n", 1)[0].strip() for t in texts]
    pairs = [
        (prompt_ids(tokenizer, ex, fmt), answer_ids(tokenizer, ex, a, fmt)) for ex, a in zip(pool, answers, strict=True)
    ]
    logprobs = answer_token_logprobs(model, pairs, tokenizer.pad_token_id, batch_size)
    return [(a, sum(math.exp(x) for x in lp) / len(lp)) for a, lp in zip(answers, logprobs, strict=True)]


def pseudo_label(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    labelled: Task,
    pool: list[Example],
    *,
    confidence: float,
    keep_top: float | None = None,
    batch_size: int = 16,
    fmt: PromptFormat,
) -> tuple[list[Example], dict[str, Any]]:
    """Label `pool` with `model`; keep examples whose confidence is at least `confidence` and, with
    `keep_top`, only that fraction of the pool, the most confident (a weak teacher's labels are mostly
    wrong, but its most confident ones less so)."""
    if not pool:
        raise MoergeError("self_train: the unlabelled pool is empty")
    pool = with_choices(pool, labelled)
    model.eval()
    if labelled.is_multiple_choice:
        labels = label_choices(model, tokenizer, pool, batch_size, fmt)
    else:
        longest = max(len(answer_ids(tokenizer, ex, ex.target, fmt)) for ex in labelled.train)
        labels = label_generation(model, tokenizer, pool, batch_size, longest + 8, fmt)
    confident = [(i, answer, conf) for i, (answer, conf) in enumerate(labels) if conf >= confidence and answer]
    if keep_top is not None:  # the most confident fraction, back in pool order
        confident = sorted(sorted(confident, key=lambda item: -item[2])[: math.ceil(keep_top * len(pool))])
    kept = [
        replace(pool[i], target=answer, meta={"confidence": round(conf, 4), "gold": pool[i].target})
        for i, answer, conf in confident
    ]
    stats: dict[str, Any] = {
        "pool": len(pool),
        "kept": len(kept),
        "confidence_threshold": confidence,
        "keep_top": keep_top,
        "mean_confidence": round(sum(c for _, c in labels) / len(labels), 4),
    }
    graded = [labelled.scorer(ex.target, replace(ex, target=ex.meta["gold"])) for ex in kept if ex.meta["gold"]]
    if graded:  # the pool came with answers: how good are the pseudo labels?
        stats["pseudo_label_accuracy"] = round(sum(graded) / len(graded), 4)
    return kept, stats


def write_pseudo(path: Path, examples: list[Example]) -> None:
    rows = [{**ex.to_dict(), "confidence": ex.meta["confidence"]} for ex in examples]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_pseudo(path: Path, labelled: Task) -> Task:
    """The pseudo-labelled examples as a train-only task scored like the labelled one."""
    examples = []
    for _, row in _jsonl(path):
        choices = row.get("choices")
        examples.append(Example(row["input"], row["target"], tuple(choices) if choices else None))
    return Task(
        name=f"{labelled.name}-pseudo",
        source=str(path),
        train=examples,
        validation=[],
        test=[],
        scorer=labelled.scorer,
    )
