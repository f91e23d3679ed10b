"""`gym:<generator>[?size=N&seed=S&<generator options>]`: seeded reasoning-gym tasks.

Each example keeps its reasoning-gym entry in `meta["entry"]` because the generator's own
`score_answer(answer, entry)` needs it to grade free-form answers.
"""

from __future__ import annotations

import difflib
from typing import Any
from urllib.parse import parse_qsl

from moerge.data.sources import RawTask, task_source
from moerge.data.task import Example
from moerge.errors import MoergeError

DEFAULT_SIZE = 500


def _coerce(value: str) -> Any:
    """Query values are text; generator options want ints, floats and booleans."""
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def parse_gym_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """`gym:name?a=1&b=x` -> ("name", {"a": 1, "b": "x"})."""
    name, _, query = spec.removeprefix("gym:").partition("?")
    if not name:
        raise MoergeError(f"{spec}: expected gym:<generator>, e.g. gym:basic_arithmetic")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise MoergeError(f"{spec}: query must look like ?size=600&seed=3&option=value") from None
    return name, {key: _coerce(value) for key, value in pairs}


def _generator_names() -> list[str]:
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def _create(spec: str, name: str, options: dict[str, Any]) -> Any:
    import reasoning_gym

    if name not in _generator_names():
        close = difflib.get_close_matches(name, _generator_names(), n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see reasoning_gym.factory.DATASETS"
        raise MoergeError(f"{spec}: unknown reasoning-gym generator {name!r}; {hint}")
    options = {"size": DEFAULT_SIZE, "seed": 0, **options}
    for key, least in (("size", 1), ("seed", 0)):
        if not isinstance(options[key], int) or options[key] < least:
            raise MoergeError(f"{spec}: {key}: expected a whole number ≥ {least}, got {options[key]!r}")
    try:
        return reasoning_gym.create_dataset(name, **options)
    except (TypeError, ValueError, AssertionError) as exc:
        raise MoergeError(f"{spec}: bad options for generator {name!r}: {exc}") from None


@task_source("gym", usage="gym:<generator>[?size=N&seed=S&option=value]", prefix="gym")
def load_gym(spec: str) -> RawTask:
    """Generate `size` (default 500) examples from the query's `seed` (default 0, independent of the
    split seed, so the data stays the same task); scoring uses the generator's `score_answer`."""
    name, options = parse_gym_spec(spec)
    dataset = _create(spec, name, options)
    examples = [
        Example(input=entry["question"], target=str(entry["answer"]), meta={"entry": entry}) for entry in dataset
    ]

    def score(prediction: str, example: Example) -> float:
        return float(dataset.score_answer(prediction.strip(), example.meta["entry"]))

    doc = (type(dataset).__doc__ or "").strip().split("\n", 1)[0]
    return RawTask(name=f"gym_{name}", examples=examples, scorer=score, description=doc)
