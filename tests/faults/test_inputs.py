"""Bad command-line input and bad input files: binary data given as jsonl/csv/YAML, counts below 1,
unknown library URL schemes, unknown BIG-bench tasks (refused before anything is downloaded), training
settings that do not fit the base, and output folders that cannot be written.

Each is refused with exit 2 and one `error:` line naming the file, line or option, no traceback, and
nothing that existed before changes (nor is anything left behind).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from faultkit import assert_refused, moerge, unchanged

BINARY = bytes(range(256)) * 8  # not UTF-8, and full of NUL bytes


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    return folder


# ---------------------------------------------------------------------------------------- binary files


@pytest.mark.parametrize(
    ("name", "content"), [("data.jsonl", BINARY), ("data.csv", BINARY), ("nul.jsonl", b"{}\x00\n")]
)
def test_a_binary_data_file_is_refused_at_its_line(name: str, content: bytes, inputs: Path) -> None:
    (inputs / name).write_bytes(content)
    with unchanged(inputs):
        line = assert_refused(moerge("data", "show", inputs / name), f"{inputs / name}:1")
    assert "text" in line


@pytest.mark.parametrize(
    ("command", "content"),
    [(["train"], BINARY), (["train"], b"base: x\x00\x01\nsteps: 2\n"), (["merge"], BINARY)],
    ids=["train-recipe-not-utf8", "train-recipe-nul", "merge-config-not-utf8"],
)
def test_a_binary_yaml_file_is_refused(command: list[str], content: bytes, inputs: Path) -> None:
    recipe = inputs / "recipe.yaml"
    recipe.write_bytes(content)
    with unchanged(inputs):
        assert_refused(moerge(*command, recipe), recipe)


# ---------------------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["eval", "--limit", "0"], "--limit"),
        (["eval", "--limit", "-1"], "--limit"),
        (["eval", "--task-limit", "0"], "--task-limit"),
        (["eval", "--batch-size", "0"], "--batch-size"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "-1"], "--max-new-tokens"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    ],
)
def test_counts_below_one_are_refused_before_loading(
    args: list[str], flag: str, tiny_base: Path, parity_task: str
) -> None:
    task = ["--task", parity_task] if args[0] == "eval" else []
    line = assert_refused(moerge(*args, "--base", tiny_base, *task), flag)
    assert "at least 1" in line


@pytest.mark.parametrize(
    ("args", "flag"),
    [(["data", "show", "{task}", "--limit", "0"], "--limit"), (["data", "show", "{task}", "--n", "-1"], "--n")],
)
def test_data_show_counts_are_refused(args: list[str], flag: str, parity_task: str) -> None:
    assert_refused(moerge(*(a.format(task=parity_task) for a in args)), flag)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--port", "0"], "--port"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--router", "{folder}"], "--router"),
        (["--auto", "nope"], "--auto"),
        (["--api-key-env", "MOERGE_FAULTS_UNSET"], "--api-key-env"),
        (["--prompt-format", "x"], "no such option"),
    ],
)
def test_serve_options_are_refused_before_serving(args: list[str], flag: str, tiny_base: Path, tmp_path: Path) -> None:
    with unchanged(tmp_path):
        assert_refused(moerge("serve", "--base", tiny_base, *(a.format(folder=tmp_path) for a in args)), flag)


def test_route_explain_limit_is_refused(tmp_path: Path, parity_task: str) -> None:
    assert_refused(moerge("route", "explain", "--router", tmp_path, "--task", parity_task, "--limit", "0"), "--limit")


# ---------------------------------------------------------------------------------------- library URLs


@pytest.mark.parametrize(
    "args",
    [
        ["library", "list", "foo://x"],
        ["route", "build", "--router", "uniform", "--library", "foo://x", "--base", "{base}", "--out", "{out}"],
        ["merge", "--method", "linear", "--library", "foo://x", "--experts", "a,b", "--out", "merged"],
    ],
    ids=["library-list", "route-build", "merge"],
)
def test_an_unknown_library_url_scheme_is_refused(args: list[str], tiny_base: Path, tmp_path: Path) -> None:
    args = [a.format(base=tiny_base, out=tmp_path / "r") for a in args]
    assert_refused(moerge(*args, cwd=tmp_path), "foo://x")
    assert not (tmp_path / "r").exists() and not (tmp_path / "merged").exists()


# ---------------------------------------------------------------------------------------- BIG-bench


def _tiny_sdist(path: Path) -> Path:
    """A tiny sdist with the real layout (one task), as tests/data/test_bigbench.py builds."""
    task = {"examples": [{"input": f"{i}?", "target": str(i)} for i in range(5)]}
    with tarfile.open(path, "w:gz") as tar:
        data = json.dumps(task).encode()
        info = tarfile.TarInfo("bigbench-1.0.0/bigbench/benchmark_tasks/known/task.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_an_unknown_bigbench_task_in_a_local_sdist_is_refused(inputs: Path, isolated_home: Path) -> None:
    sdist = _tiny_sdist(inputs / "bigbench-1.0.0.tar.gz")
    with unchanged(inputs):
        result = moerge("data", "show", "bigbench:knwon", env={"MOERGE_BIGBENCH_SDIST": str(sdist)})
        assert "did you mean known" in assert_refused(result, "bigbench:knwon", "'knwon'")


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ("bigbench:no_such_task", ["'no_such_task'", "BIG-bench task"]),
        ("bigbench:intent_recognitoin", ["'intent_recognitoin'", "did you mean intent_recognition"]),
        ("bigbench:arithmetic/9_digit_addition", ["subtask of arithmetic", "'9_digit_addition'"]),
    ],
)
def test_an_unknown_bigbench_task_is_refused_before_any_download(
    spec: str, names: list[str], isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MOERGE_BIGBENCH_SDIST", raising=False)
    # a package index that cannot answer: a download attempt would say "could not download"
    result = moerge("data", "show", spec, env={"PIP_INDEX_URL": "http://127.0.0.1:9/simple"})
    line = assert_refused(result, spec, *names)
    assert "download" not in line and "downloading" not in result.stderr
    assert not (isolated_home / "sources").exists() and not (isolated_home / "bigbench").exists()


# ---------------------------------------------------------------------------------------- training settings


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (["--target-modules", "q_proj,qkv_proj"], ["target_modules", "'qkv_proj'", "q_proj"]),
        (["--rank", "65"], ["rank", "65", "at most"]),
        (["--method", "pissa", "--rank", "4096"], ["rank", "4096"]),
    ],
    ids=["unknown-target-module", "rank-above-layer-size", "pissa-rank-above-layer-size"],
)
def test_training_settings_that_do_not_fit_the_base_are_refused_before_any_file(
    flags: list[str], names: list[str], tiny_base: Path, parity_task: str, tmp_path: Path
) -> None:
    out = tmp_path / "expert"
    result = moerge("train", "--base", tiny_base, "--task", parity_task, "--steps", "1", *flags, "--out", out)
    assert_refused(result, *names)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "moerge_home") == []  # no expert, no .work


# ---------------------------------------------------------------------------------------- unwritable outputs


def _read_only(folder: Path) -> None:
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        folder.chmod(0o755)
        pytest.skip("running as root: a read-only folder is still writable, so this fault cannot be made")


@pytest.mark.parametrize("command", ["merge", "route-build"])
def test_a_read_only_output_folder_is_refused(
    command: str, tiny_base: Path, trained_expert: Path, tmp_path: Path
) -> None:
    parent = tmp_path / "locked"
    _read_only(parent)
    out = parent / "result"
    args = {
        "merge": ["merge", "--method", "linear", "--experts", trained_expert, "--out", out],
        "route-build": [
            "route",
            "build",
            "--router",
            "uniform",
            "--experts",
            trained_expert,
            "--base",
            tiny_base,
            "--out",
            out,
        ],
    }[command]
    try:
        with unchanged(parent, trained_expert):
            assert_refused(moerge(*args), out)
    finally:
        parent.chmod(0o755)
