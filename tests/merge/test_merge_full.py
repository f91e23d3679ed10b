"""Full output: transformers loads it, and every weight is the base's plus the merged update."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from merge_testkit import peft_deltas

from moerge.errors import MoergeError
from moerge.library.expert import check_expert_intact
from moerge.merge import MergeSpec, build_plan, run_merge
from moerge.merge.full import write_full


def full_spec(experts: dict[str, Path], base: Path, out: Path, **kw: object) -> MergeSpec:
    refs = [{"path": str(experts["a"]), "weight": 1.0}, {"path": str(experts["c"]), "weight": 0.5}]
    output = {"kind": "full", "base": str(base), "out": str(out)}
    return MergeSpec.model_validate({"method": "task_arithmetic", "experts": refs, "output": output, **kw})


def expected_state(base: Path, experts: dict[str, Path]) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    state = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(base).state_dict().items()}
    for name, weight in (("a", 1.0), ("c", 0.5)):
        for module, delta in peft_deltas(base, experts[name]).items():
            state[f"{module}.weight"] += weight * delta
    return state


def assert_loads_as(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_full_merge_equals_base_plus_update(experts: dict[str, Path], tiny_base: Path, tmp_path: Path) -> None:
    result = run_merge(full_spec(experts, tiny_base, tmp_path / "full"))
    state = expected_state(tiny_base, experts)
    assert_loads_as(result.path, state)
    assert (result.path / "tokenizer.json").is_file() and (result.path / "config.json").is_file()
    meta = check_expert_intact(result.path)
    assert meta.kind == "full" and meta.method == "merge:task_arithmetic"
    assert meta.base.fingerprint == check_expert_intact(experts["a"]).base.fingerprint
    from moerge.library.loading import load_model  # what `moerge eval --adapter` uses

    model, _ = load_model(tiny_base, result.path)
    torch.testing.assert_close(
        model.state_dict()["model.layers.0.mlp.up_proj.weight"], state["model.layers.0.mlp.up_proj.weight"]
    )


def test_sharded_output_loads(experts: dict[str, Path], tiny_base: Path, tmp_path: Path) -> None:
    plan = build_plan(full_spec(experts, tiny_base, tmp_path / "unused"))
    out = tmp_path / "sharded"
    out.mkdir()
    names = write_full(out, plan, tiny_base, max_shard_bytes=40_000)
    assert len(names) > 3 and all((out / n).is_file() for n in names)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(names)
    assert_loads_as(out, expected_state(tiny_base, experts))


def test_full_merge_refuses_another_base(experts: dict[str, Path], tiny_base: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other_base"
    shutil.copytree(tiny_base, other)
    shifted = {k: v + 1 for k, v in load_file(other / "model.safetensors").items()}
    save_file(shifted, other / "model.safetensors", {"format": "pt"})
    with pytest.raises(MoergeError, match="was trained on"):
        run_merge(full_spec(experts, other, tmp_path / "full"))
    assert not (tmp_path / "full").exists()


def test_full_merge_refuses_a_base_without_the_modules(
    experts: dict[str, Path], tiny_base: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base_copy"
    shutil.copytree(tiny_base, base)
    weights = load_file(base / "model.safetensors")
    weights.pop("model.layers.1.mlp.up_proj.weight")
    save_file(weights, base / "model.safetensors", {"format": "pt"})
    raw = tmp_path / "raw_c"
    shutil.copytree(experts["c"], raw)
    (raw / "moerge.json").unlink()  # a plain peft folder: no fingerprint, only the structure check applies
    spec = MergeSpec.model_validate(
        {
            "method": "linear",
            "experts": [{"path": str(raw)}],
            "output": {"kind": "full", "base": str(base), "out": str(tmp_path / "o")},
        }
    )
    with pytest.raises(MoergeError, match=r"no weight model\.layers\.1\.mlp\.up_proj\.weight"):
        run_merge(spec)
