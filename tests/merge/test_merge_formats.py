"""A merge records its experts' prompt format, or `mixed` and which expert had which."""

from __future__ import annotations

import shutil
from pathlib import Path

from moerge.data.formats import PLAIN, RAW
from moerge.library.expert import read_expert_meta, write_expert_meta
from moerge.merge import MergeSpec, run_merge


def _with_format(source: Path, dest: Path, fmt) -> Path:
    shutil.copytree(source, dest)
    write_expert_meta(dest, read_expert_meta(dest).model_copy(update={"prompt_format": fmt}))
    return dest


def _merge(folders: list[Path], out: Path):
    refs = [{"path": str(f)} for f in folders]
    spec = MergeSpec.model_validate(
        {"method": "linear", "experts": refs, "output": {"kind": "adapter", "out": str(out)}}
    )
    return run_merge(spec).meta


def test_merge_keeps_a_shared_format_and_records_a_disagreement(experts: dict[str, Path], tmp_path: Path) -> None:
    a = _with_format(experts["a"], tmp_path / "a", PLAIN)
    b = _with_format(experts["b"], tmp_path / "b", PLAIN.model_copy(update={"name": "mine"}))
    c = _with_format(experts["c"], tmp_path / "c", RAW)
    agreed = _merge([a, b], tmp_path / "ab")
    assert agreed.prompt_format == PLAIN and "prompt_formats" not in agreed.provenance
    assert read_expert_meta(tmp_path / "ab").prompt_format == PLAIN
    mixed = _merge([a, c], tmp_path / "ac")
    assert mixed.prompt_format == "mixed"
    assert mixed.provenance["prompt_formats"] == {"a": "plain", "c": "raw"}
    assert [s["prompt_format"] for s in mixed.provenance["sources"]] == ["plain", "raw"]
