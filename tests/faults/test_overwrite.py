"""`--overwrite` replaces only a moerge output of the command's own kind, atomically; anything else at
`--out` (a user's folder, a file, a link, a peft adapter, a model folder, another kind of output) is
refused with one line and left byte-identical. One rule for every command: `moerge.paths.check_replaceable`.

Which output each command may replace: train and merge an expert folder (moerge.json), route build a
router folder (config.json with "router" + tensors.safetensors). An expert is never a valid target of
`route build --overwrite` (nor a router of train/merge): a typo in --out must not destroy a trained
expert. A missing or empty folder is always fine with --overwrite.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from faultkit import assert_refused, moerge, unchanged

from moerge import paths
from moerge.errors import MoergeError
from moerge.paths import EXPERT, ROUTER, atomic_directory, check_replaceable, output_kind

REFUSE = "refusing to replace it"
TRAIN = ["--method", "lora", "--rank", "2", "--steps", "2", "--batch-size", "4", "--max-length", "48"]


# ---- what may stand at --out -----------------------------------------------------------------------


def user_folder(at: Path) -> Path:
    (at / "sub").mkdir(parents=True)
    (at / "notes.txt").write_text("three weeks of notes\n")
    (at / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return at


def a_file(at: Path) -> Path:
    at.write_text("not a folder\n")
    return at


def link_to_folder(at: Path) -> Path:
    at.symlink_to(user_folder(at.parent / "link-target"), target_is_directory=True)
    return at


def dangling_link(at: Path) -> Path:
    at.symlink_to(at.parent / "nowhere")
    return at


def peft_adapter(at: Path) -> Path:
    """An adapter trained with plain peft: no moerge.json, so not moerge's to replace."""
    at.mkdir()
    (at / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (at / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    return at


def model_folder(at: Path) -> Path:
    """A transformers model folder: config.json without a "router" field."""
    at.mkdir()
    (at / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (at / "model.safetensors").write_bytes(b"\0" * 64)
    return at


def foreign_moerge_json(at: Path) -> Path:
    """A file called moerge.json that is not an expert's metadata."""
    at.mkdir()
    (at / "moerge.json").write_text(json.dumps({"settings": {"theme": "dark"}}))
    (at / "photo.jpg").write_bytes(b"\xff\xd8")
    return at


def router_folder(at: Path) -> Path:
    at.mkdir()
    (at / "config.json").write_text(json.dumps({"format": 2, "router": "arrow", "experts": [], "policy": {}}))
    (at / "tensors.safetensors").write_bytes(b"\0" * 16)
    return at


def compare_output(at: Path) -> Path:
    (at / "cache").mkdir(parents=True)
    (at / "results.json").write_text("{}")
    return at


def expert_copy(source: Path) -> Callable[[Path], Path]:
    def make(at: Path) -> Path:
        shutil.copytree(source, at)
        return at

    return make


FOREIGN = {
    "user-folder": (user_folder, "not a moerge output"),
    "file": (a_file, "is a file"),
    "link-to-folder": (link_to_folder, "symbolic link"),
    "dangling-link": (dangling_link, "symbolic link"),
    "peft-adapter": (peft_adapter, "not a moerge output"),
    "model-folder": (model_folder, "not a moerge output"),
    "foreign-moerge-json": (foreign_moerge_json, "not a moerge output"),
}


@pytest.fixture
def work(tmp_path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- moerge train --------------------------------------------------------------------------------


def train(tiny_base: Path, task: str, out: Path, *extra: str):
    return moerge("train", "--base", tiny_base, "--task", task, *TRAIN, "--out", out, *extra)


NOT_EXPERTS = {
    **FOREIGN,
    "router-folder": (router_folder, "is a router folder, not an expert folder"),
    "compare-output": (compare_output, "is a compare output, not an expert folder"),
}


@pytest.mark.parametrize("target", NOT_EXPERTS)
def test_train_overwrite_refuses_what_is_not_an_expert(target, tiny_base, parity_task, work) -> None:
    make, reason = NOT_EXPERTS[target]
    out = make(work / "out")
    with unchanged(work):
        result = train(tiny_base, parity_task, out, "--overwrite")
    assert_refused(result, str(out), reason, REFUSE)


def test_train_without_overwrite_names_the_foreign_folder(tiny_base, parity_task, work) -> None:
    out = user_folder(work / "out")
    with unchanged(work):
        result = train(tiny_base, parity_task, out)
    assert_refused(result, str(out), "not a moerge output (no moerge.json", "choose another --out")


def test_train_under_a_file_is_one_line(tiny_base, parity_task, work) -> None:
    blocker = a_file(work / "blocker")
    with unchanged(work):
        result = train(tiny_base, parity_task, blocker / "expert", "--overwrite")
    assert_refused(result, str(blocker / "expert"))


def test_train_keeps_an_expert_without_overwrite(tiny_base, parity_task, trained_expert, work) -> None:
    out = expert_copy(trained_expert)(work / "out")
    with unchanged(work):
        result = train(tiny_base, parity_task, out)
    assert_refused(result, str(out), "already exists", "--overwrite")


def test_train_overwrite_replaces_an_expert(tiny_base, parity_task, trained_expert, work) -> None:
    out = expert_copy(trained_expert)(work / "out")
    before = json.loads((out / "moerge.json").read_text())
    result = train(tiny_base, parity_task, out, "--overwrite", "--seed", "7")
    assert result.returncode == 0, result.stderr
    after = json.loads((out / "moerge.json").read_text())
    assert after["created"] != before["created"] and after["hyperparameters"]["seed"] == 7
    assert entries(work) == ["out"]  # no temp folder, no work folder, no set-aside old expert


# ---- moerge merge --------------------------------------------------------------------------------


def merge(expert: Path, out: Path, *extra: str):
    return moerge("merge", "--experts", expert, "--method", "linear", "--out", out, *extra)


@pytest.mark.parametrize("target", ["user-folder", "file", "link-to-folder", "peft-adapter", "model-folder"])
def test_merge_overwrite_refuses_what_is_not_an_expert(target, trained_expert, work) -> None:
    make, reason = FOREIGN[target]
    out = make(work / "out")
    with unchanged(work, trained_expert):
        result = merge(trained_expert, out, "--overwrite")
    assert_refused(result, str(out), reason, REFUSE)


def test_merge_overwrite_refuses_a_router_folder(trained_expert, work) -> None:
    out = router_folder(work / "out")
    with unchanged(work, trained_expert):
        result = merge(trained_expert, out, "--overwrite")
    assert_refused(result, str(out), "is a router folder, not an expert folder", REFUSE)


def test_merge_overwrite_replaces_an_expert_and_fills_an_empty_folder(trained_expert, work) -> None:
    empty = work / "empty"
    empty.mkdir()
    first = merge(trained_expert, empty, "--overwrite")
    assert first.returncode == 0, first.stderr
    assert output_kind(empty) == EXPERT
    previous = (empty / "moerge.json").read_bytes()
    again = merge(trained_expert, empty, "--overwrite", "--scaling", "0.5")
    assert again.returncode == 0, again.stderr
    assert (empty / "moerge.json").read_bytes() != previous
    assert json.loads((empty / "moerge.json").read_text())["hyperparameters"]["scaling"] == 0.5
    assert entries(work) == ["empty"]


# ---- moerge route build ---------------------------------------------------------------------------
# (the router is built before its folder is written, so each of these loads the base: a few only)


def route_build(tiny_base: Path, expert: Path, out: Path, *extra: str):
    return moerge("route", "build", "--router", "arrow", "--experts", expert, "--base", tiny_base, "--out", out, *extra)


@pytest.mark.parametrize("target", ["user-folder", "file"])
def test_route_build_overwrite_refuses_what_is_not_a_router(target, tiny_base, trained_expert, work) -> None:
    make, reason = FOREIGN[target]
    out = make(work / "out")
    with unchanged(work, trained_expert):
        result = route_build(tiny_base, trained_expert, out, "--overwrite")
    assert_refused(result, str(out), reason, REFUSE)


def test_route_build_overwrite_never_replaces_an_expert(tiny_base, trained_expert, work) -> None:
    out = expert_copy(trained_expert)(work / "out")
    with unchanged(work, trained_expert):
        result = route_build(tiny_base, trained_expert, out, "--overwrite")
    assert_refused(result, str(out), "is an expert folder, not a router folder", REFUSE)


def test_route_build_overwrite_replaces_a_router(tiny_base, trained_expert, work) -> None:
    out = router_folder(work / "out")
    result = route_build(tiny_base, trained_expert, out, "--overwrite")
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["router"] == "arrow" and config["experts"][0]["path"] == str(trained_expert.resolve())
    assert entries(work) == ["out"]


# ---- the rule and the swap, in process ------------------------------------------------------------


def test_replacing_is_atomic_and_leaves_nothing_beside(trained_expert, work) -> None:
    out = expert_copy(trained_expert)(work / "e")
    old = (out / "moerge.json").read_bytes()
    with atomic_directory(out, overwrite=True, kind=EXPERT) as tmp:
        (tmp / "moerge.json").write_text(json.dumps({"name": "e", "base": {}}))
        assert (out / "moerge.json").read_bytes() == old  # readers see the old expert until the swap
    assert json.loads((out / "moerge.json").read_text()) == {"name": "e", "base": {}}
    assert entries(work) == ["e"]


def test_an_error_while_writing_keeps_the_old_folder(trained_expert, work) -> None:
    out = expert_copy(trained_expert)(work / "e")
    with (
        unchanged(work),
        pytest.raises(RuntimeError, match="boom"),
        atomic_directory(out, overwrite=True, kind=EXPERT) as tmp,
    ):
        (tmp / "half.bin").write_bytes(b"x" * 1000)
        raise RuntimeError("boom")


def test_a_full_disk_while_writing_is_one_line_and_keeps_the_old_folder(trained_expert, work) -> None:
    out = expert_copy(trained_expert)(work / "e")
    with (
        unchanged(work),
        pytest.raises(MoergeError, match=r"e: could not be written \(No space left") as caught,
        atomic_directory(out, overwrite=True, kind=EXPERT) as tmp,
    ):
        (tmp / "half.bin").write_bytes(b"x" * 1000)
        raise OSError(28, "No space left on device", str(tmp / "half.bin"))
    assert "\n" not in str(caught.value)


def test_a_folder_that_appears_meanwhile_is_not_replaced(work) -> None:
    out = work / "out"
    with (
        pytest.raises(MoergeError, match="not a moerge output"),
        atomic_directory(out, overwrite=True, kind=EXPERT) as tmp,
    ):
        (tmp / "moerge.json").write_text("{}")
        user_folder(out)  # the user put something there while moerge was writing
    assert entries(out) == ["notes.txt", "sub"] and [p.name for p in work.iterdir()] == ["out"]


def test_the_next_writer_removes_a_killed_writers_temp_folder(work) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    leftover = work / f".e.{pid}-abc123_x.tmp"  # what `atomic_directory` leaves when killed with SIGKILL
    (leftover / "sub").mkdir(parents=True)
    (leftover / "sub" / "big.bin").write_bytes(b"\0" * 4096)
    live = work / f".e.{os.getpid()}-live00.tmp"  # a live writer's (ours) is kept
    live.mkdir()
    other = work / ".notes.txt.abc.tmp"  # not a folder temp of `e`: never touched
    other.write_text("x")
    with atomic_directory(work / "e") as tmp:
        (tmp / "f").write_text("new")
    assert entries(work) == sorted([".notes.txt.abc.tmp", live.name, "e"])


def test_an_interrupted_two_step_swap_is_undone_by_the_next_writer(trained_expert, work, monkeypatch) -> None:
    """Where the atomic exchange is unsupported, the old folder is set aside first; a crash between the
    two renames leaves it at `.e.old`, and the next writer puts it back before anything else."""
    monkeypatch.setattr(paths, "_exchange", lambda a, b: False)
    shutil.copytree(trained_expert, work / ".e.old")
    with pytest.raises(MoergeError, match="already exists"), atomic_directory(work / "e", kind=EXPERT) as tmp:
        (tmp / "moerge.json").write_text("{}")
    assert entries(work) == ["e"] and output_kind(work / "e") == EXPERT
    with atomic_directory(work / "e", overwrite=True, kind=EXPERT) as tmp:  # the fallback swap itself
        (tmp / "moerge.json").write_text(json.dumps({"name": "e", "base": {}}))
    assert entries(work) == ["e"] and json.loads((work / "e" / "moerge.json").read_text())["base"] == {}


def test_the_rule_itself(work, trained_expert) -> None:
    check_replaceable(work / "missing", overwrite=False)
    (work / "empty").mkdir()
    check_replaceable(work / "empty", overwrite=True, kind=ROUTER)  # empty: fine for any writer
    with pytest.raises(MoergeError, match="already exists"):
        check_replaceable(work / "empty", overwrite=False)
    router = router_folder(work / "router")
    check_replaceable(router, overwrite=True, kind=ROUTER)
    check_replaceable(router, overwrite=True)  # no kind: any moerge output (the caches' writers)
    assert output_kind(expert_copy(trained_expert)(work / "e")) == EXPERT
    assert output_kind(compare_output(work / "cmp")) == "compare"
    assert output_kind(peft_adapter(work / "peft")) is None
