"""`moerge eval --predictions FILE.jsonl`: one JSON line per scored example; a bad path is refused first."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from helpers import addition_rows, parity_rows, write_task
from moerge.cli.main import app
from moerge.data.loaders import load_task

runner = CliRunner()


def _eval(tiny_base, task: str, *extra: str) -> dict:
    args = ["eval", "--base", str(tiny_base), "--task", task, "--limit", "5", "--json", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rank_classification_predictions_file(tiny_base, tmp_path):
    task = write_task(tmp_path / "parity.jsonl", parity_rows(40))
    out = tmp_path / "preds.jsonl"
    out.write_text("an older file, replaced\n")
    metrics = _eval(tiny_base, task, "--predictions", str(out))
    rows = _rows(out)
    examples = load_task(task, seed=0).test[:5]  # the examples `moerge eval` scores: the test split, seed 0
    assert metrics["n"] == 5 and metrics["predictions"] == str(out)
    assert [r["input"] for r in rows] == [ex.input for ex in examples]
    assert [r["target"] for r in rows] == [ex.target for ex in examples]
    assert [r["id"] for r in rows] == [0, 1, 2, 3, 4]
    for row in rows:
        assert row["choices"] == ["yes", "no"] and len(row["choice_logprobs"]) == 2
        assert row["chosen"] == row["choices"][row["choice_logprobs"].index(max(row["choice_logprobs"]))]
        assert row["correct"] is (row["chosen"] == row["target"]) and row["score"] == float(row["correct"])
        assert row["input"] in row["prompt"]
    assert metrics["accuracy"] == sum(r["score"] for r in rows) / 5


def test_generation_predictions_file(tiny_base, tmp_path):
    task = write_task(tmp_path / "add.jsonl", addition_rows(40))
    out = tmp_path / "preds.jsonl"
    metrics = _eval(tiny_base, task, "--predictions", str(out))
    rows = _rows(out)
    assert len(rows) == 5 and all(isinstance(r["output"], str) and "chosen" not in r for r in rows)
    assert metrics["accuracy"] == sum(r["score"] for r in rows) / 5
    assert "predictions" not in _eval(tiny_base, task)  # no flag, no file named


def test_a_folder_is_refused_before_anything_loads(tmp_path):
    task = write_task(tmp_path / "parity.jsonl", parity_rows(10))
    (tmp_path / "taken").mkdir()
    args = ["eval", "--base", "./no/such/model", "--task", task, "--predictions", str(tmp_path / "taken")]
    result = subprocess.run([sys.executable, "-m", "moerge.cli", *args], capture_output=True, text=True, cwd=tmp_path)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "--predictions:" in lines[0] and "is not a regular file" in lines[0]  # not the missing model
    assert list((tmp_path / "taken").iterdir()) == []
