"""Every command answers --help, and user errors are one line on stderr with exit status 2."""

import subprocess
import sys

import pytest

COMMANDS = [
    "",
    "demo",
    "compare",
    "models",
    "models fetch",
    "models list",
    "data show",
    "train",
    "train-library",
    "eval",
    "generate",
    "library",
    "merge",
    "route",
    "route build",
    "route explain",
]


def _moerge(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moerge.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_every_command_has_help():
    from typer.testing import CliRunner

    from moerge.cli.main import app

    runner = CliRunner()
    for command in COMMANDS:
        result = runner.invoke(app, [*command.split(), "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Usage" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compare", "missing.yaml"], "missing.yaml: not found (expected a compare recipe file)"),
        (["train", "--base", "b", "--task", "t.jsonl", "--method", "magic", "--out", "x"], "unknown training method"),
        (["eval", "--base", "./no/such/model", "--task", "gym:basic_arithmetic?size=10"], "no such model folder"),
        (["models", "fetch", "gpt-17"], "unknown packaged model"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    result = _moerge(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_bad_compare_recipe_names_file_line_and_field(tmp_path):
    (tmp_path / "c.yaml").write_text("base: x\nheld_in: [a.jsonl]\nstrategies: [base]\nevall_limit: 3\n")
    result = _moerge("compare", "c.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "c.yaml:4: evall_limit: Extra inputs are not permitted" in result.stderr
