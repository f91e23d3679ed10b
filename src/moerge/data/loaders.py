"""`load_task(spec)`: the source registered for the spec (see `moerge.data.sources`) gives `RawTask`
examples, optionally already split; `load_task` then applies the shared rules once: seeded `limit`,
deterministic splitting, missing splits cut from train.
"""

from __future__ import annotations

import random
from pathlib import Path

from moerge.data import bigbench, files, gym  # noqa: F401  (importing them registers the built-in sources)
from moerge.data.sources import SOURCES, SPLITS, RawTask, TaskSource
from moerge.data.task import Example, Task, split_examples
from moerge.errors import MoergeError


def _sources() -> list[TaskSource]:
    """The registered sources (their prefixes, suffixes and folder kinds do not overlap, so order is free)."""
    return [source for _, source in SOURCES.items()]


def known_sources() -> str:
    return ", ".join(src.usage for src in _sources())


def resolve_source(spec: str) -> TaskSource:
    """Pick the source for `spec`: explicit prefix first, then file suffix, then an existing folder."""
    prefix, sep, _ = spec.partition(":")
    if sep:
        for src in _sources():
            if src.prefix == prefix:
                return src
    suffix = Path(spec).suffix.lower()
    for src in _sources():
        if suffix and suffix in src.suffixes:
            return src
    if Path(spec).is_dir():
        for src in _sources():
            if src.folder:
                return src
    if Path(spec).is_file():
        raise MoergeError(f"{spec}: unsupported file type {suffix or '(none)'}; known sources: {known_sources()}")
    if sep and len(prefix) > 1:
        raise MoergeError(f"{spec}: unknown task source {prefix!r}; known sources: {known_sources()}")
    raise MoergeError(f"{spec}: no such data file or folder; known sources: {known_sources()}")


def _limited(raw: RawTask, limit: int, seed: int) -> RawTask:
    """Keep `limit` examples chosen by a seeded shuffle, remembering each one's given split."""
    if raw.presplit is None:
        order = list(raw.examples)
        random.Random(seed).shuffle(order)
        raw.examples = order[:limit]
        return raw
    tagged = [(split, ex) for split in SPLITS for ex in raw.presplit.get(split, [])]
    random.Random(seed).shuffle(tagged)
    kept = tagged[:limit]
    raw.presplit = {split: [ex for s, ex in kept if s == split] for split in SPLITS}
    return raw


def _fill_missing_splits(given: dict[str, list[Example]], seed: int) -> dict[str, list[Example]]:
    """Splits the data lacks are cut from train the same way `split_examples` would cut them."""
    missing = [s for s in SPLITS if not given.get(s)]
    if not missing or "train" in missing:
        return {s: list(given.get(s, [])) for s in SPLITS}
    pieces = dict(zip(SPLITS, split_examples(given["train"], seed=seed), strict=True))
    out = {s: list(given[s]) for s in SPLITS if s not in missing}
    out["train"] = pieces["train"] + [ex for s in ("validation", "test") if s not in missing for ex in pieces[s]]
    for split in missing:
        out[split] = pieces[split]
    return out


def load_task(spec: str, *, seed: int = 0, limit: int | None = None) -> Task:
    """Load a task from a data file, a saved `datasets` folder, `gym:<name>` or `bigbench:<task>`.

    The same spec, seed and limit give the same splits every time.
    """
    if limit is not None and limit < 1:
        raise MoergeError(f"--limit: must be at least 1, got {limit}")
    raw = resolve_source(spec).load(spec)
    if limit is not None:
        raw = _limited(raw, limit, seed)
    if raw.presplit is None:
        splits = dict(zip(SPLITS, split_examples(raw.examples, seed=seed), strict=True))
    else:
        splits = _fill_missing_splits(raw.presplit, seed)
    if not any(splits.values()):
        raise MoergeError(f"{spec}: the task has no examples (expected rows with 'input' and 'target')")
    return Task(
        name=raw.name,
        source=spec,
        train=splits["train"],
        validation=splits["validation"],
        test=splits["test"],
        scorer=raw.scorer,
        description=raw.description,
    )
