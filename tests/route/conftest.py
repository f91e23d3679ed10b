"""Fixtures: four tiny LoRA experts on the shared tiny base, and a few training examples for each."""

from __future__ import annotations

from pathlib import Path

import pytest
from route_helpers import EXPERT_SPECS, make_expert, task_examples

from moerge.data.task import Example


@pytest.fixture(scope="session")
def experts(tiny_base: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("experts")
    return {
        name: make_expert(tiny_base, root / name, seed, meta_task=f"task_{name}", **spec)
        for seed, (name, spec) in enumerate(EXPERT_SPECS.items())
    }


@pytest.fixture(scope="session")
def expert_data() -> dict[str, list[Example]]:
    return {name: task_examples(name) for name in EXPERT_SPECS}
