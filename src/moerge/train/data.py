"""What a training run sees: encoded items from one or more tasks (or raw text), and the order of batches.

Batch contents are a pure function of (seed, step), so a resumed run sees the batches it would have.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from moerge.data.prompts import Encoded, encode_for_training
from moerge.errors import MoergeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from moerge.data.task import Task
    from moerge.train.config import TrainConfig


def batch_order(n_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of the examples in batch `step`: epochs are seeded permutations laid end to end."""
    start = step * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n_examples)
        perm = _permutation(n_examples, seed * 100_003 + epoch)
        out.extend(perm[offset : offset + batch_size - len(out)])
    return out


@lru_cache(maxsize=64)
def _permutation(n: int, seed: int) -> tuple[int, ...]:
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    return tuple(perm)


class Sampler(Protocol):
    def batch(self, step: int) -> list[int]: ...


@dataclass
class ConcatSampler:
    """All tasks' examples as one pool, shuffled per epoch."""

    size: int
    batch_size: int
    seed: int

    def batch(self, step: int) -> list[int]:
        return batch_order(self.size, self.batch_size, self.seed, step)


class MixtureSampler:
    """Each batch slot draws a task with probability `probs[t]`, then that task's next example.

    Within a task, examples come in seeded per-epoch permutations, so a task is covered evenly. The
    draws of step s depend only on (seed, s); how far each task has advanced is counted and cached.
    """

    def __init__(self, sizes: list[int], probs: list[float], batch_size: int, seed: int) -> None:
        self.sizes, self.probs, self.batch_size, self.seed = sizes, probs, batch_size, seed
        self.offsets = [sum(sizes[:t]) for t in range(len(sizes))]
        self._used_before: list[list[int]] = [[0] * len(sizes)]  # per step: draws of each task so far

    def tasks_at(self, step: int) -> list[int]:
        rng = random.Random(self.seed * 1_000_003 + step)
        return rng.choices(range(len(self.sizes)), weights=self.probs, k=self.batch_size)

    def batch(self, step: int) -> list[int]:
        while len(self._used_before) <= step:
            counts = list(self._used_before[-1])
            for t in self.tasks_at(len(self._used_before) - 1):
                counts[t] += 1
            self._used_before.append(counts)
        cursor = list(self._used_before[step])
        out = []
        for t in self.tasks_at(step):
            epoch, offset = divmod(cursor[t], self.sizes[t])
            out.append(self.offsets[t] + _permutation(self.sizes[t], (self.seed + t) * 100_003 + epoch)[offset])
            cursor[t] += 1
        return out


def mixing_probs(sizes: list[int], cfg: TrainConfig) -> list[float]:
    """Sampling probability of each task under `cfg.mixing` (concat samples like proportional)."""
    if cfg.mixing == "weights":
        raw = list(cfg.weights or [])
    elif cfg.mixing == "temperature":
        raw = [n ** (1.0 / cfg.temperature) for n in sizes]
    else:
        raw = [float(n) for n in sizes]
    total = sum(raw)
    return [w / total for w in raw]


@dataclass
class TrainingData:
    """Encoded items, which task each came from, and the batch order."""

    items: list[Encoded]
    task_of: list[int]
    task_names: list[str]
    sampler: Sampler

    def batch_indices(self, step: int) -> list[int]:
        return self.sampler.batch(step)


def task_data(tasks: list[Task], tokenizer: PreTrainedTokenizerBase, cfg: TrainConfig) -> TrainingData:
    """Encode every task's training split and pick the sampler `cfg.mixing` asks for."""
    items: list[Encoded] = []
    task_of: list[int] = []
    for t, task in enumerate(tasks):
        if not task.train:
            raise MoergeError(f"{task.source}: the task has no training examples")
        items.extend(encode_for_training(tokenizer, ex, cfg.max_length, cfg.format) for ex in task.train)
        task_of.extend([t] * len(task.train))
    names = unique_names([task.name for task in tasks])
    if cfg.mixing == "concat" or len(tasks) == 1:
        sampler: Sampler = ConcatSampler(len(items), cfg.batch_size, cfg.seed)
    else:
        sizes = [len(task.train) for task in tasks]
        sampler = MixtureSampler(sizes, mixing_probs(sizes, cfg), cfg.batch_size, cfg.seed)
    return TrainingData(items, task_of, names, sampler)


def unique_names(names: list[str]) -> list[str]:
    """Task names, suffixed where two tasks share one, so per-task logs do not collide."""
    out = []
    for i, name in enumerate(names):
        out.append(name if names.count(name) == 1 else f"{name}#{names[:i].count(name) + 1}")
    return out


def read_documents(path: Path) -> list[str]:
    """Documents of a raw text file: blank-line separated paragraphs (.txt) or `text` fields (.jsonl)."""
    path = Path(path)
    if not path.is_file():
        raise MoergeError(f"{path}: text file not found")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [p.strip() for p in path.read_text().split("\n\n") if p.strip()]
    if suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MoergeError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise MoergeError(f"{path}:{lineno}: expected an object with a string field 'text'")
            docs.append(row["text"])
        return docs
    raise MoergeError(f"{path}: raw text must be .txt or .jsonl (with a 'text' field), not {suffix or 'no suffix'}")


def text_hash(files: list[str]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(Path(file).read_bytes())
    return digest.hexdigest()


def text_chunks(files: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[list[int]]:
    """Token ids of the documents, joined by the end token and cut into `max_length` blocks."""
    stream: list[int] = []
    for file in files:
        for doc in read_documents(Path(file)):
            stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
            stream.append(tokenizer.eos_token_id)
    chunks = [stream[i : i + max_length] for i in range(0, len(stream), max_length)]
    chunks = [c for c in chunks if len(c) > 1]
    if not chunks:
        raise MoergeError(f"{', '.join(files)}: no text to train on")
    return chunks


def text_data(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> TrainingData:
    """Continued pre-training: every token of the raw text is a target (plain LM loss)."""
    chunks = text_chunks(list(cfg.text or []), tokenizer, cfg.max_length)
    items = [Encoded(list(c), list(c)) for c in chunks]
    return TrainingData(items, [0] * len(items), ["text"], ConcatSampler(len(items), cfg.batch_size, cfg.seed))
