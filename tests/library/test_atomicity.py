"""Crashes at every step of an add leave the old state or the new one; concurrent writers lose nothing."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from library_testkit import make_adapter, make_expert

from moerge.errors import MoergeError
from moerge.library import ExpertLibrary, read_expert_meta
from moerge.library import library as library_module


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return make_adapter(root / "old", seed=0), make_adapter(root / "new", seed=1, r=2)


def bookkeeping(lib: ExpertLibrary) -> list[str]:
    return sorted(p.name for p in Path(lib.root).iterdir() if p.name.startswith(".") and p.name != ".lock")


def assert_state(lib: ExpertLibrary, expected_task: str, expected_src: Path) -> None:
    """The library shows exactly one intact expert `e` whose files are those of `expected_src`."""
    assert lib.names() == ["e"]
    assert lib.meta("e").task.name == expected_task
    assert read_expert_meta(lib.path("e")).files == read_expert_meta(expected_src).files
    assert lib.verify().ok


# Runs `add(..., overwrite=True)` in a child that dies (os._exit, no cleanup) at a chosen step.
CRASHER = textwrap.dedent(
    """
    import os, shutil, sys
    from moerge.library import ExpertLibrary
    from moerge.library.catalog import Catalog

    root, src, step = sys.argv[1:]
    lib = ExpertLibrary(root)
    die = lambda *a, **k: os._exit(17)
    if step == "copy":  # die after copying the first file into the temp folder
        real_tree, calls = shutil.copytree, []
        def copy(*a, **k):
            calls.append(a)
            if len(calls) == 2:
                die()
            return shutil.copy2(*a, **k)
        shutil.copytree = lambda src, dst, **kw: real_tree(src, dst, **{**kw, "copy_function": copy})
    elif step.startswith("mv"):  # die before the n-th rename (1: old aside, 2: new in place)
        real_mv, moves = lib.fs.mv, []
        def mv(*a, **k):
            moves.append(a)
            if len(moves) == int(step[2:]):
                die()
            return real_mv(*a, **k)
        lib.fs.mv = mv
    elif step == "catalog":  # die after the new folder is in place, before the catalog row
        Catalog.upsert = die
    elif step == "cleanup":  # die after the catalog commit, before the old folder is removed
        lib.fs.rm = die
    lib.add(src, name="e", overwrite=True)
    """
)


@pytest.mark.parametrize(
    ("step", "survivor"),
    [("copy", "old"), ("mv1", "old"), ("mv2", "old"), ("catalog", "new"), ("cleanup", "new")],
)
def test_crash_during_overwrite_leaves_old_or_new(tmp_path, adapters, step, survivor) -> None:
    lib = ExpertLibrary.create(tmp_path / "lib")
    old = make_expert(tmp_path / "old", adapters[0], name="e", task="old")
    new = make_expert(tmp_path / "new", adapters[1], name="e", task="new")
    lib.add(old)
    proc = subprocess.run(
        [sys.executable, "-c", CRASHER, str(lib.root), str(new), step], capture_output=True, text=True
    )
    assert proc.returncode == 17, proc.stderr
    reopened = ExpertLibrary(lib.root)  # recovery runs on open when a swap was interrupted
    assert reopened.names() == ["e"] and reopened.meta("e").task.name == survivor
    # only the dead add's temp copy may remain; it is never listed, verify reports it, rebuild removes it
    leftovers = bookkeeping(reopened)
    assert all(name.startswith(".tmp-") for name in leftovers)
    assert reopened.verify().leftovers == leftovers
    reopened.rebuild()
    assert bookkeeping(reopened) == []
    assert_state(reopened, survivor, old if survivor == "old" else new)


def test_exception_mid_add_leaves_old_state(tmp_path, adapters, monkeypatch) -> None:
    lib = ExpertLibrary.create(tmp_path / "lib")
    old = make_expert(tmp_path / "old", adapters[0], name="e", task="old")
    new = make_expert(tmp_path / "new", adapters[1], name="e", task="new")
    fresh = make_expert(tmp_path / "fresh", adapters[1], name="fresh")
    lib.add(old)
    real_copytree = shutil.copytree

    def copy_then_corrupt(src, dst, **kwargs):
        real_copytree(src, dst, **kwargs)
        (Path(dst) / "adapter_model.safetensors").write_bytes(b"bit rot during copy")

    monkeypatch.setattr(library_module.shutil, "copytree", copy_then_corrupt)
    with pytest.raises(MoergeError, match=r"copy failed verification.*nothing was added"):
        lib.add(new, overwrite=True)
    with pytest.raises(MoergeError, match="copy failed verification"):
        lib.add(fresh)
    monkeypatch.undo()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lib.catalog, "upsert", boom)  # fails after the rename: the marker restores the old
    with pytest.raises(OSError, match="disk full"):
        lib.add(new, overwrite=True)
    monkeypatch.undo()
    assert_state(ExpertLibrary(lib.root), "old", old)
    assert bookkeeping(lib) == []


WORKER = textwrap.dedent(
    """
    import os, sys, time
    from moerge.library import ExpertLibrary

    root, src, prefix, go = sys.argv[1:]
    lib = ExpertLibrary(root)
    while not os.path.exists(go):  # start together, so the adds really interleave
        time.sleep(0.005)
    for i in range(20):
        lib.add(src, name=f"{prefix}-{i:02d}")
    """
)


def test_two_processes_adding_twenty_each(tmp_path, adapters) -> None:
    lib = ExpertLibrary.create(tmp_path / "lib")
    srcs = [make_expert(tmp_path / p, adapters[i], name=p, task=p) for i, p in enumerate(("p", "q"))]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(lib.root), str(src), src.name, str(tmp_path / "go")],
            stderr=subprocess.PIPE,
        )
        for src in srcs
    ]
    (tmp_path / "go").touch()
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    names = lib.names()
    assert len(names) == 40
    assert names == sorted(f"{p}-{i:02d}" for p in "pq" for i in range(20))
    report = lib.verify()
    assert report.ok and report.checked == 40
    for name in names:
        assert lib.meta(name).task.name == name[0]
        assert read_expert_meta(lib.path(name)).files == read_expert_meta(tmp_path / name[0]).files
    assert bookkeeping(lib) == []
