"""`moerge route build` over a library and `moerge route explain` on a task file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
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


def _moerge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moerge.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize(
    ("router", "option", "message"),
    [
        ("arrow", "steps=2", "--option: steps: not an option of router 'arrow' (its options: none)"),
        ("glider", "stepz=2", "--option: stepz: not an option of router 'glider' (its options: embedder, steps,"),
        ("phatgoose", "steps=many", "--option: steps: Input should be a valid integer"),
        ("glider", "descriptions={nope", "--option: descriptions: not valid JSON"),
    ],
)
def test_build_refuses_bad_options_in_one_line(tmp_path, router, option, message):
    expert = tmp_path / "alpha"
    expert.mkdir()
    args = ["route", "build", "--router", router, "--experts", str(expert), "--out", "r", "--option", option]
    result = _moerge(*args, cwd=tmp_path)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "r").exists()


def test_option_values_are_coerced_by_the_router_model():
    from moerge.cli.help import option_values
    from moerge.route import get_router
    from moerge.yamlconf import Source

    raw = option_values(["steps=3", "alpha=2.5", 'descriptions={"alpha": "fruit"}', "describer=text"])
    options = get_router("glider").parse_options(raw, Source("--option"))
    assert (options.steps, options.alpha, options.describer) == (3, 2.5, "text")
    assert options.descriptions == {"alpha": "fruit"}


def test_build_help_lists_every_router_and_its_options():
    from moerge.route import router_names

    result = runner.invoke(app, ["route", "build", "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # the help is wrapped to the terminal's width
    for name in router_names():
        assert f" {name}: " in text
    assert "steps: gate training steps per expert, on its own data (default 100)" in text
    assert "describer: how experts are described: examples" in text
