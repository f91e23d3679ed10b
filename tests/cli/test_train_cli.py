"""`moerge train`: single runs, staged recipes (resumable), and one-line errors."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from helpers import parity_rows, write_task
from moerge.cli.main import app
from moerge.errors import MoergeError

runner = CliRunner()
FAST = {"batch_size": 4, "max_length": 48, "lr": 5e-3, "rank": 4, "eval_limit": 2, "steps": 2}


def test_staged_recipe_trains_every_stage_and_cli_options_win(tiny_base, tmp_path):
    task = write_task(tmp_path / "parity.jsonl", parity_rows(30))
    recipe = tmp_path / "recipe.yaml"
    stages = [{"name": "warm", "steps": 3}, {"name": "polish", "method": "full", "start": "merge"}]
    recipe.write_text(yaml.safe_dump({"base": str(tiny_base), "task": task, **FAST, "stages": stages}))
    out = tmp_path / "expert"
    result = runner.invoke(app, ["train", str(recipe), "--out", str(out), "--eval-limit", "1"])
    assert result.exit_code == 0, result.output
    assert "stages=2" in result.output
    meta = json.loads((out / "moerge.json").read_text())
    assert [s["stage"] for s in meta["stages"]] == ["warm", "polish"] and meta["kind"] == "full"
    assert [s["metrics"]["test"]["n"] for s in meta["stages"]] == [1, 1]
    assert [s["hyperparameters"]["steps"] for s in meta["stages"]] == [3, 2]
    again = runner.invoke(app, ["train", str(recipe), "--out", str(out)])
    assert isinstance(again.exception, MoergeError) and "--overwrite" in str(again.exception)


def test_bad_stage_is_one_clear_error(tiny_base, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(tiny_base), "stages": [{"type": "pretrain"}]}))
    result = runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path / "e")])
    assert isinstance(result.exception, MoergeError)
    assert "recipe.yaml:3: stages.0: " in str(result.exception) and "text" in str(result.exception)


def test_training_records_its_prompt_format(tiny_base, tmp_path):
    task = write_task(tmp_path / "parity.jsonl", parity_rows(30))
    args = [
        "train",
        "--base",
        str(tiny_base),
        "--task",
        task,
        *(f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()),
    ]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "plain"), "--prompt-format", "plain"])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "plain" / "moerge.json").read_text())
    assert meta["prompt_format"]["name"] == "plain" and meta["metrics"]["test"]["prompt_format"] == "plain"
    # staged: every task stage in the same format records it; different formats record `mixed`
    recipe = tmp_path / "recipe.yaml"
    stages = [{"name": "a", "prompt_format": "raw"}, {"name": "b", "prompt_format": {"user": "Q: {input}"}}]
    recipe.write_text(yaml.safe_dump({"base": str(tiny_base), "task": task, **FAST, "stages": stages}))
    result = runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path / "staged")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "staged" / "moerge.json").read_text())["prompt_format"] == "mixed"
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "x"), "--prompt-format", "chatty"])
    assert "--prompt-format: unknown prompt format 'chatty'" in str(result.exception)
