"""A task: examples split deterministically into train/validation/test, plus how to score answers."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Scorer = Callable[[str, "Example"], float]


@dataclass(frozen=True)
class Example:
    """One prompt/answer pair. `choices` makes it multiple-choice (scored by rank classification)."""

    input: str
    target: str
    choices: tuple[str, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"input": self.input, "target": self.target}
        if self.choices is not None:
            out["choices"] = list(self.choices)
        return out


def normalise_answer(text: str) -> str:
    """Lower-case, trim, collapse spaces and strip trailing punctuation for exact-match scoring."""
    text = text.strip().lower()
    text = re.sub(r"\s+", " ", text)
    return text.strip(" .!?;:\"'")


def exact_match(prediction: str, example: Example) -> float:
    """1.0 when the first line of the prediction equals the target after normalisation."""
    first_line = prediction.strip().split("\n", 1)[0] if prediction.strip() else ""
    return float(normalise_answer(first_line) == normalise_answer(example.target))


@dataclass
class Task:
    """Examples of one task with fixed splits. `scorer` grades free-form answers."""

    name: str
    source: str
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    scorer: Scorer = exact_match
    description: str = ""

    def split(self, name: str) -> list[Example]:
        if name not in ("train", "validation", "test"):
            from moerge.errors import MoergeError

            raise MoergeError(f"unknown split {name!r}: expected train, validation or test")
        return getattr(self, name)

    @property
    def is_multiple_choice(self) -> bool:
        examples = self.train or self.test
        return bool(examples) and all(ex.choices for ex in examples)

    def data_hash(self) -> str:
        """sha256 over every example of every split, so an expert records exactly what it saw."""
        digest = hashlib.sha256()
        for split in ("train", "validation", "test"):
            for ex in self.split(split):
                digest.update(json.dumps([split, ex.to_dict()], sort_keys=True).encode())
        return digest.hexdigest()

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def split_examples(
    examples: Sequence[Example], *, seed: int = 0, fractions: tuple[float, float] = (0.1, 0.2)
) -> tuple[list[Example], list[Example], list[Example]]:
    """Shuffle with `seed` and cut into train/validation/test; same input, same split, every time.

    `fractions` are the validation and test shares. Small sets keep at least one example in each
    split where possible.
    """
    order = list(examples)
    random.Random(seed).shuffle(order)
    n = len(order)
    n_val = max(1, round(n * fractions[0])) if n >= 3 else 0
    n_test = max(1, round(n * fractions[1])) if n >= 3 else 0
    test = order[:n_test]
    validation = order[n_test : n_test + n_val]
    train = order[n_test + n_val :]
    return train, validation, test
