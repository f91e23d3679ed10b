"""Opening experts for merging: Δ equals peft's own get_delta_weight; bad mixes and features refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from merge_testkit import make_lora, peft_deltas

from moerge.errors import MoergeError
from moerge.library.adapter import LoraAdapter
from moerge.library.expert import read_expert_meta, write_expert_meta
from moerge.merge.plan import open_experts


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_delta_equals_peft_delta_weight(name: str, experts: dict[str, Path], tiny_base: Path) -> None:
    """Covers alpha/r, rsLoRA's alpha/√r, rank_pattern and alpha_pattern."""
    (expert,) = open_experts({name: experts[name]})
    expected = peft_deltas(tiny_base, experts[name])
    assert expert.modules == sorted(expected)
    for module, delta in expected.items():
        a, b = expert.factors(module)
        torch.testing.assert_close(b @ a, delta)
        assert expert.shape(module) == tuple(delta.shape)


def test_missing_module_is_none(experts: dict[str, Path]) -> None:
    expert = LoraAdapter.open(experts["a"])
    assert expert.factors("model.layers.0.mlp.up_proj") is None


def test_experts_on_different_bases_are_refused(experts: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(experts["b"], other)
    meta = read_expert_meta(other)
    write_expert_meta(other, meta.model_copy(update={"base": meta.base.model_copy(update={"fingerprint": "x"})}))
    with pytest.raises(MoergeError, match="different base models"):
        open_experts({"a": experts["a"], "other": other})


def test_shape_mismatch_is_refused(experts: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    other = tmp_path / "wide"
    shutil.copytree(experts["a"], other)
    (other / "moerge.json").unlink()
    weights = load_file(other / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("q_proj.lora_A.weight"))
    weights[key] = torch.zeros(weights[key].shape[0], 7)
    save_file(weights, other / "adapter_model.safetensors")
    with pytest.raises(MoergeError, match=r"q_proj is \(64, 64\) in a but \(64, 7\) in wide"):
        open_experts({"a": experts["a"], "wide": other})


def test_dora_and_non_lora_folders_are_refused(tiny_base: Path, tmp_path: Path) -> None:
    dora = make_lora(tmp_path / "dora", tiny_base, seed=0, r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(MoergeError, match=r"use_dora is set .*; merging supports plain LoRA updates only"):
        open_experts({"dora": dora})
    with pytest.raises(MoergeError, match=r"adapter_config\.json: not found"):
        open_experts({"empty": tmp_path})


def test_corrupted_expert_is_refused(experts: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(experts["a"], broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 99}))
    with pytest.raises(MoergeError, match="sha256 mismatch"):
        open_experts({"broken": broken})
