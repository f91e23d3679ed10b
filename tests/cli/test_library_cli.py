"""`moerge library ...`: each command end to end on a real library; problems are exit codes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import moerge.library.peft_import
from moerge.cli.main import app
from moerge.errors import MoergeError
from moerge.library import ExpertLibrary

_spec = importlib.util.spec_from_file_location(
    "library_testkit", Path(__file__).parents[1] / "library" / "library_testkit.py"
)
testkit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(testkit)

runner = CliRunner()
COMMANDS = ["create", "add", "import-peft", "list", "show", "remove", "export", "verify", "rebuild"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return testkit.make_adapter(tmp_path_factory.mktemp("cli") / "plain")


def invoke(*args: str):
    return runner.invoke(app, ["library", *map(str, args)], env={"COLUMNS": "200"})


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_full_workflow(tmp_path, adapter, monkeypatch) -> None:
    monkeypatch.setattr(moerge.library.peft_import, "fingerprint", testkit.fake_fingerprint)
    monkeypatch.setattr(moerge.library.peft_import, "base_layer_shapes", testkit.fake_layer_shapes)
    lib = tmp_path / "lib"
    assert invoke("create", lib).exit_code == 0
    src = testkit.make_expert(tmp_path / "e", adapter, name="e", task="add", metrics={"acc": 0.75})
    result = invoke("add", lib, src, "--name", "adder")
    assert result.exit_code == 0 and "added adder" in result.output
    result = invoke("import-peft", lib, adapter, "--task", "sort", "--base", "tiny-llama", "--name", "sorter")
    assert result.exit_code == 0, result.output
    assert "imported sorter (lora" in result.output

    table = invoke("list", lib).output
    assert "adder" in table and "sorter" in table and "acc=0.75" in table
    listed = json.loads(invoke("list", lib, "--task", "sort", "--json").output)
    assert [m["name"] for m in listed] == ["sorter"] and listed[0]["task"]["name"] == "sort"
    assert json.loads(invoke("list", lib, "--metric", "acc", "--min", "0.8", "--json").output) == []
    shown = json.loads(invoke("show", lib, "adder").output)
    assert shown == ExpertLibrary(lib).meta("adder").model_dump(mode="json")

    assert invoke("export", lib, "adder", tmp_path / "out").exit_code == 0
    exported = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert exported == sorted([*(p.name for p in adapter.iterdir()), "moerge.json"])
    assert invoke("export", lib, "adder", tmp_path / "peft", "--peft-only").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == sorted(p.name for p in adapter.iterdir())

    assert invoke("verify", lib).exit_code == 0
    (lib / "sorter" / "adapter_config.json").write_text("{}")
    result = invoke("verify", lib)
    assert result.exit_code == 1
    assert "corrupted sorter" in result.output and "sha256 mismatch" in result.output
    assert invoke("remove", lib, "sorter").exit_code == 0
    assert invoke("verify", lib).exit_code == 0

    (lib / "catalog.sqlite").unlink()
    result = invoke("rebuild", lib)
    assert result.exit_code == 0 and "1 experts" in result.output
    assert ExpertLibrary(lib).names() == ["adder"]


def test_user_errors_raise_moerge_error(tmp_path, adapter) -> None:
    lib = tmp_path / "lib"
    invoke("create", lib)
    src = testkit.make_expert(tmp_path / "e", adapter, name="e")
    result = invoke("add", lib, src, "--name", "../escape")
    assert isinstance(result.exception, MoergeError) and "expert name '../escape'" in str(result.exception)
    invoke("add", lib, src)
    result = invoke("add", lib, src)
    assert isinstance(result.exception, MoergeError) and "--overwrite" in str(result.exception)
    assert invoke("add", lib, src, "--overwrite").exit_code == 0


def test_error_is_one_line_exit_2(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "from moerge.cli.main import run; run()", "library", "list", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "not a moerge library" in proc.stderr
    assert "Traceback" not in proc.stderr
