"""Fixtures of the fault suite (tests/faults): a tiny base and a finished expert, built once."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import parity_rows, write_task


@pytest.fixture(scope="session")
def parity_task(tmp_path_factory) -> str:
    return write_task(tmp_path_factory.mktemp("faults_data") / "parity.jsonl", parity_rows(40))


@pytest.fixture(scope="session")
def trained_expert(tiny_base: Path, parity_task: str, tmp_path_factory) -> Path:
    """A real moerge expert (LoRA on the tiny base, 2 steps), for the faults that need one."""
    from moerge.recipes.train import train_expert
    from moerge.train import TrainConfig

    out = tmp_path_factory.mktemp("faults_expert") / "parity"
    cfg = TrainConfig(
        base=str(tiny_base), task=parity_task, rank=2, steps=2, batch_size=4, max_length=48, eval_split=None
    )
    train_expert(cfg, out, progress=False)
    return out
