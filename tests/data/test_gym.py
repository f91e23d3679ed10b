"""reasoning-gym tasks: seeded generation, query options, the generator's own scorer, errors."""

from __future__ import annotations

import pytest

from moerge.data import load_task
from moerge.data.gym import parse_gym_spec
from moerge.errors import MoergeError


def all_examples(task):
    return task.train + task.validation + task.test


def test_query_options_are_coerced() -> None:
    name, options = parse_gym_spec("gym:basic_arithmetic?size=20&seed=3&min_terms=2&ratio=0.5&flag=true&w=x")
    assert name == "basic_arithmetic"
    assert options == {"size": 20, "seed": 3, "min_terms": 2, "ratio": 0.5, "flag": True, "w": "x"}


def test_gym_task_is_seeded_and_keeps_entries() -> None:
    import reasoning_gym

    spec = "gym:basic_arithmetic?size=30&seed=3&min_terms=2&max_terms=2"
    task = load_task(spec)
    assert task.name == "gym_basic_arithmetic" and task.source == spec
    assert sum(task.sizes().values()) == 30 and task.description
    reference = {
        e["question"]: str(e["answer"])
        for e in reasoning_gym.create_dataset("basic_arithmetic", size=30, seed=3, min_terms=2, max_terms=2)
    }
    assert {ex.input: ex.target for ex in all_examples(task)} == reference
    assert all(ex.meta["entry"]["metadata"]["num_terms"] == 2 for ex in all_examples(task))
    assert load_task(spec).data_hash() == task.data_hash()
    assert load_task(spec.replace("seed=3", "seed=4")).data_hash() != task.data_hash()


def test_default_size_and_limit() -> None:
    assert sum(load_task("gym:leg_counting").sizes().values()) == 500
    assert sum(load_task("gym:leg_counting", limit=12).sizes().values()) == 12


def test_scorer_uses_the_generators_score_answer() -> None:
    task = load_task("gym:basic_arithmetic?size=10")
    example = task.test[0]
    assert task.scorer(example.target, example) == 1.0
    assert task.scorer(f" {example.target}\n", example) == 1.0
    assert task.scorer(str(int(example.target) + 1), example) == 0.0


def test_unknown_generator_suggests_close_names() -> None:
    with pytest.raises(MoergeError, match=r"gym:basic_arithmetix: unknown reasoning-gym generator.*basic_arithmetic"):
        load_task("gym:basic_arithmetix")


@pytest.mark.parametrize("query", ["bogus_option=1", "min_terms=5&max_terms=2"])
def test_bad_generator_options(query: str) -> None:
    with pytest.raises(MoergeError, match=r"bad options for generator 'basic_arithmetic'"):
        load_task(f"gym:basic_arithmetic?size=5&{query}")
