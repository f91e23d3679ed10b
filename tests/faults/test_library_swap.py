"""The library's swap and its derived artifacts, stopped at chosen points, in this process.

A swap (add, overwrite, remove) renames folders and commits a catalog row: whatever point an exception
or signal stops it at, the folder on disk and the catalog row must agree afterwards (the old state, or
the new one), with no bookkeeping left. An artifact write that dies leaves a temp file under
`<expert>/artifacts/`: `verify` reports it as a leftover and `rebuild` removes it; a live write's temp
file is neither reported nor removed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from faultkit import moerge

from moerge.library import ExpertLibrary
from moerge.library.catalog import Catalog
from moerge.library.expert import sha256_file
from moerge.paths import hold


@pytest.fixture
def lib(tmp_path, trained_expert) -> Path:
    """A library holding one expert, `parity`."""
    root = tmp_path / "lib"
    ExpertLibrary.create(root).add(trained_expert, name="parity")
    return root


@pytest.fixture
def other(tmp_path, trained_expert) -> Path:
    """Another expert (other files, other sha256s) to put in place of `parity`."""
    folder = Path(shutil.copytree(trained_expert, tmp_path / "other"))
    meta = json.loads((folder / "moerge.json").read_text())
    (folder / "notes.txt").write_text("a file the first expert does not have\n")
    meta["files"] = {**meta["files"], "notes.txt": sha256_file(folder / "notes.txt")}
    (folder / "moerge.json").write_text(json.dumps(meta))
    return folder


def files(folder: Path) -> dict:
    return json.loads((folder / "moerge.json").read_text())["files"]


def bookkeeping(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") and p.name != ".lock")


def assert_consistent(root: Path) -> None:
    """Catalog and folders agree (verify finds nothing) and no swap left anything behind."""
    library = ExpertLibrary(root)
    report = library.verify()
    assert report.ok, report.to_dict()
    assert bookkeeping(root) == []
    for name in library.names():
        assert library.meta(name).files == files(root / name)


class Stop(KeyboardInterrupt):
    """What the entry point's SIGTERM handler raises, here raised by hand at a chosen point."""


def stop_after_first(monkeypatch, owner, name: str) -> None:
    """Make `owner.name` do its work, then raise `Stop` (the first call only)."""
    real, calls = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        if not calls:
            calls.append(1)
            raise Stop()
        return result

    monkeypatch.setattr(owner, name, wrapper)


# ---- the swap -------------------------------------------------------------------------------------------


def test_overwrite_stopped_after_the_catalog_commit_keeps_folder_and_row_together(lib, other, monkeypatch):
    before = files(lib / "parity")
    stop_after_first(monkeypatch, Catalog, "upsert")
    with pytest.raises(Stop):
        ExpertLibrary(lib).add(other, name="parity", overwrite=True)
    monkeypatch.undo()
    assert files(lib / "parity") in (before, files(other))
    assert_consistent(lib)


def test_remove_stopped_after_the_catalog_commit_keeps_folder_and_row_together(lib, monkeypatch):
    stop_after_first(monkeypatch, Catalog, "delete")
    with pytest.raises(Stop):
        ExpertLibrary(lib).remove("parity")
    monkeypatch.undo()
    assert_consistent(lib)
    assert ExpertLibrary(lib).names() == (["parity"] if (lib / "parity").exists() else [])


@pytest.mark.parametrize("which", [1, 2], ids=["old-set-aside", "new-renamed-in"])
def test_overwrite_stopped_right_after_a_rename_keeps_one_intact_expert(lib, other, monkeypatch, which):
    """A signal that lands after a rename finished but before the next line ran: the undo must look at
    the folders, not at how far the swap thinks it got."""
    library = ExpertLibrary(lib)
    before = files(lib / "parity")
    real, calls = library.fs.mv, []

    def mv(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(args)
        if len(calls) == which:
            raise Stop()

    monkeypatch.setattr(library.fs, "mv", mv)
    with pytest.raises(Stop):
        library.add(other, name="parity", overwrite=True)
    monkeypatch.undo()
    assert files(lib / "parity") == before
    assert not (lib / "parity" / "notes.txt").exists() and not (lib / "parity" / ".old-parity").exists()
    assert_consistent(lib)


def test_a_first_add_stopped_after_its_rename_leaves_no_expert(lib, other, monkeypatch):
    library = ExpertLibrary(lib)
    real = library.fs.mv

    def mv(*args, **kwargs):
        real(*args, **kwargs)
        raise Stop()

    monkeypatch.setattr(library.fs, "mv", mv)
    with pytest.raises(Stop):
        library.add(other, name="fresh")
    monkeypatch.undo()
    assert not (lib / "fresh").exists()
    assert ExpertLibrary(lib).names() == ["parity"]
    assert_consistent(lib)


# ---- artifact temp files ------------------------------------------------------------------------------

KEY = {"router": "arrow", "top": 1}
TENSORS = {"p": torch.ones(4)}


def test_a_dead_artifact_writes_temp_file_is_reported_then_removed_by_rebuild(lib):
    artifacts = lib / "parity" / "artifacts"
    artifacts.mkdir()
    dead = artifacts / "arrow.safetensors.1700000000-0123abcd.tmp"  # what a write killed with SIGKILL leaves
    dead.write_bytes(b"half a safetensors file")
    library = ExpertLibrary(lib)
    report = library.verify()
    assert report.leftovers == ["parity/artifacts/" + dead.name] and not report.ok
    shown = moerge("library", "verify", lib)
    assert shown.returncode == 1 and f"leftover parity/artifacts/{dead.name}" in shown.stdout, shown.stdout
    library.rebuild()
    assert not dead.exists() and library.verify().ok


def test_a_live_artifact_writes_temp_file_is_neither_reported_nor_removed(lib):
    artifacts = lib / "parity" / "artifacts"
    artifacts.mkdir()
    live = artifacts / "arrow.safetensors.1700000000-0123abcd.tmp"
    live.write_bytes(b"being written")
    with hold(live):
        library = ExpertLibrary(lib)
        assert library.verify().leftovers == []
        library.rebuild()
        library.save_artifact("parity", "gates", KEY, TENSORS)  # another write of the same expert
        assert live.is_file()
    assert ExpertLibrary(lib).verify().leftovers == ["parity/artifacts/" + live.name]


def test_the_next_artifact_write_removes_a_dead_ones_temp_file(lib):
    artifacts = lib / "parity" / "artifacts"
    artifacts.mkdir()
    dead = artifacts / "arrow.safetensors.0123abcd.tmp"  # an older moerge's name (no time)
    dead.write_bytes(b"")
    library = ExpertLibrary(lib)
    library.save_artifact("parity", "arrow", KEY, TENSORS)
    assert sorted(p.name for p in artifacts.iterdir()) == ["arrow.safetensors"]
    assert torch.equal(library.load_artifact("parity", "arrow", KEY)["p"], TENSORS["p"])
    assert library.verify().ok


def test_an_artifact_write_stopped_midway_leaves_no_temp_file(lib, monkeypatch):
    library = ExpertLibrary(lib)
    stop_after_first(monkeypatch, library.fs, "pipe_file")
    with pytest.raises(Stop):
        library.save_artifact("parity", "arrow", KEY, TENSORS)
    monkeypatch.undo()
    assert list((lib / "parity" / "artifacts").iterdir()) == []
    assert library.verify().ok
