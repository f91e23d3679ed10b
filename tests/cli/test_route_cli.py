"""`moerge route build` over a library and `moerge route explain` on a task file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "route"))
from route_helpers import EXPERT_SPECS, make_expert, task_examples

from moerge.cli.main import app

runner = CliRunner()


def test_build_and_explain(tmp_path, tiny_base):
    from moerge.library import ExpertLibrary

    lib = ExpertLibrary.create(tmp_path / "lib")
    for seed, name in enumerate(["alpha", "beta"]):
        lib.add(make_expert(tiny_base, tmp_path / name, seed, meta_task=f"task_{name}", **EXPERT_SPECS[name]))
    rows = [ex.to_dict() for ex in task_examples("alpha", 10)]
    task_file = tmp_path / "task_alpha.jsonl"
    task_file.write_text("".join(json.dumps(r) + "\n" for r in rows))

    out = tmp_path / "router"
    result = runner.invoke(
        app,
        [
            "route",
            "build",
            "--library",
            str(lib.url),
            "--router",
            "arrow",
            "--experts",
            "alpha,beta",
            "--top-k",
            "1",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["policy"]["k"] == 1
    assert (tmp_path / "lib" / "alpha" / "artifacts" / "arrow.safetensors").is_file()

    result = runner.invoke(app, ["route", "explain", "--router", str(out), "--task", str(task_file), "--layers"])
    assert result.exit_code == 0, result.output
    assert "alpha" in result.output and "beta" in result.output and "q_proj" in result.output


def test_build_refuses_bad_input(tmp_path):
    result = runner.invoke(
        app,
        [
            "route",
            "build",
            "--router",
            "arrow",
            "--experts",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code != 0
    assert "no such expert folder" in str(result.exception)
