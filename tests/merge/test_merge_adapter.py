"""Adapter output: peft loads it, and its update is the merge of peft's own expert updates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from merge_testkit import peft_deltas

from moerge.errors import MoergeError
from moerge.library.expert import check_expert_intact
from moerge.merge import MergeSpec, run_merge
from moerge.merge.adapter import truncated_svd


def spec(experts: dict[str, Path], names: list[str], weights: list[float], out: Path, **kw: object) -> MergeSpec:
    output = {"kind": "adapter", "out": str(out), **kw.pop("output", {})}  # type: ignore[dict-item]
    refs = [{"path": str(experts[n]), "weight": w} for n, w in zip(names, weights, strict=True)]
    return MergeSpec.model_validate({"method": "linear", "experts": refs, "output": output, **kw})


def expected_linear(tiny_base: Path, experts: dict[str, Path], names: list[str], coefficients: list[float]):
    """Σ c_k·Δ_k from peft's own deltas; a module missing from an expert contributes zero."""
    merged: dict[str, torch.Tensor] = {}
    for name, c in zip(names, coefficients, strict=True):
        for module, delta in peft_deltas(tiny_base, experts[name]).items():
            merged[module] = merged.get(module, torch.zeros_like(delta)) + c * delta
    return merged


def logits_with(tiny_base: Path, deltas: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    with torch.no_grad():
        for module, delta in deltas.items():
            model.get_submodule(module).weight += delta
        return model(tokens).logits


def test_linear_concat_is_exact_and_loads_in_peft(experts: dict[str, Path], tiny_base: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names, weights = ["a", "b", "c"], [0.5, 1.0, 0.5]
    result = run_merge(spec(experts, names, weights, tmp_path / "soup"))
    config = json.loads((result.path / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 14  # v_proj of layer 1: ranks 4 + 2 + 8, concatenated
    assert config["target_modules"] == ["o_proj", "q_proj", "up_proj", "v_proj"]
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), result.path)
    expected = expected_linear(tiny_base, experts, names, [w / 2.0 for w in weights])
    assert sorted(peft_deltas(tiny_base, result.path)) == sorted(expected)
    for module, delta in peft_deltas(tiny_base, result.path).items():
        torch.testing.assert_close(delta, expected[module], atol=1e-5, rtol=1e-4)
    tokens = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            merged(tokens).logits, logits_with(tiny_base, expected, tokens), atol=1e-4, rtol=1e-4
        )
    meta = check_expert_intact(result.path)
    assert meta.method == "merge:linear" and meta.task.name == "merged" and meta.kind == "adapter"
    assert [s["name"] for s in meta.provenance["sources"]] == ["a", "b", "c"]
    assert meta.provenance["sources"][1]["task"] == "task-b" and meta.hyperparameters["exact"] is True
    assert meta.base.fingerprint == check_expert_intact(experts["a"]).base.fingerprint
    assert result.reconstruction_error == {}
    from moerge.library.loading import load_model  # what `moerge eval --adapter` uses

    loaded, _ = load_model(tiny_base, result.path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, merged(tokens).logits)


def test_ties_svd_matches_peft_ties_svd(experts: dict[str, Path], tiny_base: Path, tmp_path: Path) -> None:
    """Same experts, weights, density and rank as peft's add_weighted_adapter(combination_type='ties_svd')."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    params = {"density": 0.4, "majority_sign": "frequency"}
    result = run_merge(
        spec(
            experts,
            ["a", "b"],
            [1.0, 0.6],
            tmp_path / "ties",
            method="ties",
            parameters=params,
            output={"rank": 3},
        )
    )
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), experts["a"], adapter_name="a")
    model.load_adapter(experts["b"], adapter_name="b")
    model.add_weighted_adapter(
        ["a", "b"],
        [1.0, 0.6],
        "m",
        combination_type="ties_svd",
        svd_rank=3,
        density=0.4,
        majority_sign_method="frequency",
    )
    ours = peft_deltas(tiny_base, result.path)
    assert len(ours) == 6
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "m" in module.lora_A:
            theirs = module.get_delta_weight("m")
            torch.testing.assert_close(ours[name.removeprefix("base_model.model.")], theirs, atol=1e-5, rtol=1e-4)
    meta = check_expert_intact(result.path)
    assert meta.provenance["parameters"]["density"] == 0.4 and meta.hyperparameters["rank"] == 3
    errors = meta.provenance["reconstruction_error"]
    assert set(errors) == set(ours) and all(0 < e < 1 for e in errors.values())


def test_truncated_svd_error_is_the_relative_residual() -> None:
    delta = torch.randn(20, 30, generator=torch.Generator().manual_seed(0))
    a, b, error = truncated_svd(delta, 5)
    assert a.shape == (5, 30) and b.shape == (20, 5)
    assert error == pytest.approx(float((delta - b @ a).norm() / delta.norm()), rel=1e-4)
    assert truncated_svd(delta, 20)[2] == pytest.approx(0.0, abs=1e-3)


def test_existing_output_is_kept(experts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "keep"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    with pytest.raises(MoergeError, match="already exists"):
        run_merge(spec(experts, ["a"], [1.0], out))
    assert (out / "mine.txt").read_text() == "precious"
