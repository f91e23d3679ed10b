"""Fixtures for merge tests: three tiny LoRA experts of the shared tiny base, fingerprinted."""

from __future__ import annotations

from pathlib import Path

import pytest
from merge_testkit import EXPERTS, make_lora


@pytest.fixture(scope="session")
def base_fingerprint(tiny_base: Path) -> str:
    from moerge.models import fingerprint

    return fingerprint(tiny_base)


@pytest.fixture(scope="session")
def experts(tiny_base: Path, base_fingerprint: str, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge_experts")
    return {
        name: make_lora(root / name, tiny_base, seed=i, fingerprint=base_fingerprint, **spec)
        for i, (name, spec) in enumerate(EXPERTS.items())
    }
