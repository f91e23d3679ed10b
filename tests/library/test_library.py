"""ExpertLibrary on a local folder and on memory://: catalog, filters, names, integrity, export, artifacts."""

from __future__ import annotations

import json
import shutil
import sqlite3
import uuid
from pathlib import Path

import pytest
import torch
from library_testkit import make_adapter, make_expert, tiny_llama_config
from safetensors.torch import load_file

from moerge.errors import MoergeError
from moerge.library import ExpertLibrary, read_expert_meta


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return make_adapter(tmp_path_factory.mktemp("adapter") / "plain")


@pytest.fixture(scope="module")
def other_adapter(tmp_path_factory) -> Path:
    return make_adapter(tmp_path_factory.mktemp("adapter") / "other", seed=1, r=2)


@pytest.fixture
def lib(tmp_path) -> ExpertLibrary:
    return ExpertLibrary.create(tmp_path / "lib")


def test_add_registers_copy_and_lists_with_filters(lib, adapter, tmp_path) -> None:
    specs = [("add-a", "add", "lora", 0.9), ("add-b", "add", "dora", 0.4), ("sort-a", "sort", "lora", 0.7)]
    for name, task, method, acc in specs:
        src = make_expert(tmp_path / name, adapter, name=name, task=task, method=method, metrics={"acc": acc})
        assert lib.add(src) == name
    assert lib.names() == ["add-a", "add-b", "sort-a"]
    assert [m.name for m in lib.list(task="add")] == ["add-a", "add-b"]
    assert [m.name for m in lib.list(method="lora")] == ["add-a", "sort-a"]
    assert [m.name for m in lib.list(task="add", method="dora")] == ["add-b"]
    assert [m.name for m in lib.list(base="fp-tiny")] == lib.names()  # fingerprint
    assert [m.name for m in lib.list(base="tiny-llama")] == lib.names()  # name_or_path
    assert lib.list(base="other") == []
    assert [m.name for m in lib.list(metric="acc", min_value=0.7)] == ["add-a", "sort-a"]
    assert lib.list(metric="bleu") == []
    # the library holds its own copy: the source can go away
    shutil.rmtree(tmp_path / "add-a")
    folder = lib.path("add-a")
    assert folder == Path(lib.root) / "add-a"
    assert (
        load_file(folder / "adapter_model.safetensors").keys()
        == load_file(adapter / "adapter_model.safetensors").keys()
    )
    # the catalog is a real SQLite file with one row per expert
    rows = sqlite3.connect(Path(lib.root) / "catalog.sqlite").execute("SELECT name, task FROM experts").fetchall()
    assert sorted(rows) == [("add-a", "add"), ("add-b", "add"), ("sort-a", "sort")]


def test_add_under_other_name_rewrites_name_keeps_hashes(lib, adapter, tmp_path) -> None:
    src = make_expert(tmp_path / "src", adapter, name="orig")
    assert lib.add(src, name="renamed") == "renamed"
    on_disk = read_expert_meta(lib.path("renamed"))
    assert on_disk.name == lib.meta("renamed").name == "renamed"
    assert on_disk.files == read_expert_meta(src).files


@pytest.mark.parametrize(
    "bad", ["../x", "/abs/x", "a/b", "a\\b", "", ".hidden", "..", ".", "catalog.sqlite", "x" * 200, "a b"]
)
def test_bad_names_refused_and_nothing_written(lib, adapter, tmp_path, bad) -> None:
    src = make_expert(tmp_path / "src", adapter, name="ok")
    before = sorted(p.name for p in Path(lib.root).iterdir())
    with pytest.raises(MoergeError, match="expert name"):
        lib.add(src, name=bad)
    assert sorted(p.name for p in Path(lib.root).iterdir()) == before
    assert not (tmp_path / "x").exists()
    assert lib.names() == []


def test_no_clobber_without_overwrite(lib, adapter, other_adapter, tmp_path) -> None:
    lib.add(make_expert(tmp_path / "one", adapter, name="e", task="first"))
    second = make_expert(tmp_path / "two", other_adapter, name="e", task="second")
    with pytest.raises(MoergeError, match="already exists"):
        lib.add(second)
    assert lib.meta("e").task.name == "first"
    lib.add(second, overwrite=True)
    assert lib.meta("e").task.name == "second"
    assert read_expert_meta(lib.path("e")).files == read_expert_meta(second).files
    assert lib.names() == ["e"]
    assert sorted(p.name for p in Path(lib.root).iterdir() if p.name.startswith(".")) == [".lock"]


def test_corrupted_expert_is_refused_and_reported(lib, adapter, tmp_path) -> None:
    for name in ("good", "bad", "gone"):
        lib.add(make_expert(tmp_path / name, adapter, name=name))
    with open(Path(lib.root) / "bad" / "adapter_model.safetensors", "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00\x01\x02\x03")
    shutil.rmtree(Path(lib.root) / "gone")
    make_expert(Path(lib.root) / "stray", adapter, name="stray")  # copied in by hand
    with pytest.raises(MoergeError, match=r"refusing to load expert .*bad.*sha256 mismatch"):
        lib.path("bad")
    with pytest.raises(MoergeError, match="refusing to load"):
        lib.path("gone")
    report = lib.verify()
    assert not report.ok
    assert list(report.corrupted) == ["bad"]
    assert "adapter_model.safetensors: sha256 mismatch" in report.corrupted["bad"][0]
    assert report.missing == ["gone"]
    assert report.unregistered == ["stray"]
    # rebuild re-indexes from folders: the stray one joins, the missing one leaves; corruption remains
    assert lib.rebuild() == ["bad", "good", "stray"]
    report = lib.verify()
    assert (report.missing, report.unregistered, list(report.corrupted)) == ([], [], ["bad"])


def test_remove_and_export(lib, adapter, tmp_path) -> None:
    lib.add(make_expert(tmp_path / "src", adapter, name="e"))
    (lib.path("e") / "artifacts").mkdir()
    (lib.path("e") / "artifacts" / "x.safetensors").write_bytes(b"derived")
    out = lib.export("e", tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in adapter.iterdir()), "moerge.json"])
    for f in adapter.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes()
    peft_only = lib.export("e", tmp_path / "peft-only", peft_only=True)
    assert sorted(p.name for p in peft_only.iterdir()) == sorted(p.name for p in adapter.iterdir())
    with pytest.raises(MoergeError, match="not an empty folder"):
        lib.export("e", tmp_path / "out")
    lib.remove("e")
    assert lib.names() == []
    assert not (Path(lib.root) / "e").exists()
    with pytest.raises(MoergeError, match="no expert named 'e'"):
        lib.remove("e")
    assert lib.verify().ok


def test_exported_folder_loads_in_peft(lib, adapter, tmp_path) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    lib.add(make_expert(tmp_path / "src", adapter, name="e"))
    out = lib.export("e", tmp_path / "out")
    model = PeftModel.from_pretrained(LlamaForCausalLM(tiny_llama_config()), out)
    expected = load_file(adapter / "adapter_model.safetensors")
    loaded = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert len(loaded) == sum("lora_B" in k for k in expected) > 0
    for key, value in expected.items():
        if "lora_B" in key:
            match = [v for k, v in loaded.items() if k.replace(".default", "").endswith(key.split("model.", 1)[1])]
            assert len(match) == 1 and torch.equal(match[0], value)


def test_missing_catalog_is_rebuilt_and_non_library_refused(lib, adapter, tmp_path) -> None:
    lib.add(make_expert(tmp_path / "src", adapter, name="e", task="t"))
    (Path(lib.root) / "catalog.sqlite").unlink()
    reopened = ExpertLibrary(lib.root)
    assert reopened.names() == ["e"] and reopened.meta("e").task.name == "t"
    with pytest.raises(MoergeError, match="not a moerge library"):
        ExpertLibrary(tmp_path / "src")
    with pytest.raises(MoergeError, match="already a moerge library"):
        ExpertLibrary.create(lib.root)
    with pytest.raises(MoergeError, match="not an empty folder"):
        ExpertLibrary.create(tmp_path / "src")


def test_artifacts_keyed_and_stale_when_inputs_change(lib, adapter, other_adapter, tmp_path) -> None:
    lib.add(make_expert(tmp_path / "one", adapter, name="e"))
    key = {"method": "arrow", "top": 1}
    tensors = {"layers.0.q_proj": torch.randn(4, 64), "layers.1.q_proj": torch.randn(4, 64)}
    assert lib.load_artifact("e", "arrow", key) is None  # missing
    path = lib.save_artifact("e", "arrow", key, tensors)
    assert path == lib.artifact_path("e", "arrow") == Path(lib.root) / "e" / "artifacts" / "arrow.safetensors"
    loaded = lib.load_artifact("e", "arrow", key)
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert lib.load_artifact("e", "arrow", {**key, "top": 2}) is None  # different key: stale
    assert lib.verify().ok  # artifacts are not payload: adding them does not "corrupt" the expert
    # same key, but the expert itself was replaced (even if the artifact file came along): stale
    replacement = make_expert(tmp_path / "two", other_adapter, name="e")
    shutil.copytree(Path(lib.root) / "e" / "artifacts", replacement / "artifacts")
    lib.add(replacement, overwrite=True)
    assert (lib.path("e") / "artifacts" / "arrow.safetensors").is_file()
    assert lib.load_artifact("e", "arrow", key) is None
    path.write_bytes(b"garbage")
    assert lib.load_artifact("e", "arrow", key) is None
    with pytest.raises(MoergeError, match="artifact kind"):
        lib.save_artifact("e", "../evil", key, tensors)


def test_memory_url_library_round_trip(adapter, other_adapter, tmp_path, monkeypatch) -> None:
    url = f"memory://lib-{uuid.uuid4().hex}"
    lib = ExpertLibrary.create(url)
    lib.add(make_expert(tmp_path / "a", adapter, name="a", task="ta"))
    lib.add(make_expert(tmp_path / "b", other_adapter, name="b", task="tb"))
    assert lib.names() == ["a", "b"]
    assert not (tmp_path / "catalog.sqlite").exists()
    assert lib.state_dir.is_relative_to(tmp_path / "moerge_home")  # catalog cached locally
    local = lib.path("a")
    assert read_expert_meta(local).files == read_expert_meta(tmp_path / "a").files
    assert lib.verify().ok
    # a fresh machine (empty cache) rebuilds the catalog from the moerge.json files
    monkeypatch.setenv("MOERGE_HOME", str(tmp_path / "other_home"))
    fresh = ExpertLibrary(url)
    assert fresh.names() == ["a", "b"] and fresh.meta("b").task.name == "tb"
    key = {"k": 1}
    fresh.save_artifact("a", "gates", key, {"g": torch.ones(3)})
    assert torch.equal(fresh.load_artifact("a", "gates", key)["g"], torch.ones(3))
    assert fresh.artifact_path("a", "gates").startswith("memory://")
    # another writer added an expert: reopening notices the new folder
    lib.add(make_expert(tmp_path / "c", adapter, name="c"))
    assert ExpertLibrary(url).names() == ["a", "b", "c"]
    # remote corruption: verify reports it and loading refuses
    fs = lib.fs
    fs.pipe_file(f"{lib.root}/b/adapter_model.safetensors", b"tampered")
    assert list(ExpertLibrary(url).verify().corrupted) == ["b"]
    with pytest.raises(MoergeError, match="sha256 mismatch"):
        ExpertLibrary(url).path("b")
    out = fresh.export("a", tmp_path / "exported")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    fresh.remove("a")
    assert ExpertLibrary(url).names() == ["b", "c"]


def test_prompt_format_survives_add_export_and_a_new_library(lib, adapter, tmp_path) -> None:
    from moerge.data.formats import MOERGE, PLAIN, PromptFormat
    from moerge.library.expert import recorded_format

    mine = PromptFormat(name="qa", user="Q: {input}", system="Be brief.")
    lib.add(make_expert(tmp_path / "src", adapter, name="qa", prompt_format=mine), name="qa")
    assert lib.meta("qa").prompt_format == mine
    exported = lib.export("qa", tmp_path / "exported")
    assert read_expert_meta(exported).prompt_format == mine
    other = ExpertLibrary.create(tmp_path / "other")
    other.add(exported, name="qa-copy")
    assert other.meta("qa-copy").prompt_format == mine
    # experts written before formats were recorded: moerge's own, or unknown when imported
    lib.add(make_expert(tmp_path / "old", adapter, name="old"), name="old")
    assert lib.meta("old").prompt_format is None and recorded_format(lib.meta("old")) == MOERGE
    lib.add(make_expert(tmp_path / "imp", adapter, name="imp", provenance={"imported_from": "x"}), name="imp")
    assert recorded_format(lib.meta("imp")) == "unknown"
    lib.add(make_expert(tmp_path / "plain", adapter, name="plain", prompt_format=PLAIN), name="plain")
    assert recorded_format(lib.meta("plain")) == PLAIN


def test_remove_leaves_a_folder_that_is_not_a_registered_expert(lib, tmp_path) -> None:
    mine = Path(lib.root) / "userstuff"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(MoergeError, match="not a registered expert: left alone"):
        lib.remove("userstuff")
    assert (mine / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("listed", ["../other/payload", "/etc/passwd", "a/../../b", "C:/x"])
def test_moerge_json_listing_files_outside_the_folder_is_refused(adapter, tmp_path, listed) -> None:
    folder = make_expert(tmp_path / "e", adapter, name="e")
    meta = json.loads((folder / "moerge.json").read_text())
    meta["files"][listed] = "0" * 64
    (folder / "moerge.json").write_text(json.dumps(meta))
    with pytest.raises(MoergeError, match=r"files: .*is not a path inside the expert folder"):
        read_expert_meta(folder)
