"""`moerge data show`: sizes, multiple-choice flag, examples; bad data is one line and exit 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from helpers import write_jsonl
from moerge.cli.main import app
from moerge.errors import MoergeError

runner = CliRunner()
SIZES_ROW = re.compile(r"│\s*(\d+)\s*│\s*(\d+)\s*│\s*(\d+)\s*│\s*(yes|no)\s*│")


def sizes_row(output: str) -> tuple[str, ...]:
    match = SIZES_ROW.search(output)
    assert match, output
    return match.groups()


def test_show_prints_sizes_and_examples(tmp_path: Path) -> None:
    rows = [{"input": f"Is [b]{i}[/b] even?", "target": "yes" if i % 2 == 0 else "no"} for i in range(20)]
    path = write_jsonl(tmp_path / "even.jsonl", rows)
    result = runner.invoke(app, ["data", "show", str(path), "--n", "2", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert sizes_row(result.output) == ("14", "2", "4", "no")
    assert f"source: {path}" in result.output
    assert result.output.count("example ") == 2
    assert "Is [b]" in result.output  # task text is printed literally, not as rich markup


def test_show_multiple_choice_split_and_limit(tmp_path: Path) -> None:
    rows = [{"input": f"q{i}", "target": "B", "choices": ["A", "B"]} for i in range(50)]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    args = ["data", "show", str(path), "--limit", "10", "--split", "test", "--n", "5"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sizes_row(result.output) == ("7", "1", "2", "yes")
    assert result.output.count("example ") == 2
    assert "* B" in result.output and "  A" in result.output


def test_bad_split_is_a_moerge_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "a", "target": "b"}])
    result = runner.invoke(app, ["data", "show", str(path), "--split", "dev"])
    assert isinstance(result.exception, MoergeError) and "unknown split 'dev'" in str(result.exception)


def test_bad_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input": "a", "target": "b"}\n{"input": "c"}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "moerge.cli", "data", "show", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"error: {path}:2: missing field 'target'"
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_show_renders_examples_in_a_prompt_format(tmp_path: Path, tiny_base: Path) -> None:
    rows = [{"input": f"q{i}", "target": "B", "choices": ["A", "B"]} for i in range(10)]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    args = ["data", "show", str(path), "--n", "1", "--base", str(tiny_base)]
    result = runner.invoke(app, [*args, "--prompt-format", "plain"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "in prompt format 'plain'" in result.output and "prompt (chat template):" in result.output
    assert "<|im_start|>assistant" in result.output and "Options:" not in result.output
    assert "* ['B', '<|im_end|>']" in result.output and "  ['A', '<|im_end|>']" in result.output
    raw = runner.invoke(app, [*args, "--prompt-format", "raw"], env={"COLUMNS": "200"})
    assert "prompt (no chat template):" in raw.output and "* ['Ġ', 'B']" in raw.output
    moerge = runner.invoke(app, ["data", "show", str(path), "--n", "1", "--prompt-format", "moerge"])
    assert "Answer with one of the options." in moerge.output
