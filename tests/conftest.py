"""Shared fixtures: a tiny random Llama with a byte-level tokenizer and a chat template, built offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import make_tiny_base


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return make_tiny_base(tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own $MOERGE_HOME so nothing touches the user's cache."""
    home = tmp_path / "moerge_home"
    monkeypatch.setenv("MOERGE_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home
