"""The stacked-expert layer against peft applying each LoRA on its own."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from route_helpers import load_tiny

from moerge.errors import MoergeError
from moerge.library.adapter import LoraAdapter
from moerge.route.stacked import SparseRouting, attach_experts

NAMES = ["alpha", "beta", "gamma", "delta"]


@pytest.fixture(scope="module")
def peft_models(tiny_base, experts):
    return {name: PeftModel.from_pretrained(load_tiny(tiny_base)[0], str(experts[name])).eval() for name in NAMES}


@pytest.fixture(scope="module")
def stacked(tiny_base, experts):
    model, _ = load_tiny(tiny_base)
    return attach_experts(model, [experts[n] for n in NAMES])


def test_names_modules_and_padding(stacked):
    assert stacked.expert_names == NAMES
    q0 = stacked.layers["model.layers.0.self_attn.q_proj"]
    assert q0.A.shape == (4, 4, 64) and q0.B.shape[0] == 4
    assert q0.present.tolist() == [True, True, False, True]
    assert q0.A[2].abs().sum() == 0 and q0.B[1, :, 2:].abs().sum() == 0  # missing expert, padded rank
    assert "model.layers.0.self_attn.o_proj" in stacked.layers


def test_rank_and_alpha_patterns_follow_peft(stacked, experts):
    a0, _ = LoraAdapter.open(experts["gamma"]).factors("model.layers.0.self_attn.v_proj")
    assert a0.shape[0] == 3
    v0 = stacked.layers["model.layers.0.self_attn.v_proj"]
    assert v0.A[2, 3:].abs().sum() == 0 and v0.A[2, :3].abs().sum() > 0  # gamma's rank 3, padded to 4


def test_experts_record_name_and_folder(stacked, experts):
    assert [(e.name, e.folder) for e in stacked.experts] == [(n, experts[n]) for n in NAMES]


@pytest.mark.parametrize("k", range(4))
def test_one_hot_routing_equals_peft_expert(stacked, peft_models, k):
    ids = torch.randint(0, 200, (2, 7))
    stacked.set_weights(torch.nn.functional.one_hot(torch.tensor([k, k]), 4).float())
    with torch.no_grad():
        ours = stacked.model(ids).logits
        theirs = peft_models[NAMES[k]](ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def _peft_deltas(peft_models, module: str, x: torch.Tensor) -> torch.Tensor:
    """[K, b, s, out]: each expert's own LoRA update at `module`, computed by peft (0 if absent)."""
    out = []
    for name in NAMES:
        layer = peft_models[name].base_model.model.get_submodule(module)
        with torch.no_grad():
            out.append(layer(x) - layer.get_base_layer()(x) if hasattr(layer, "lora_A") else torch.zeros_like(layer(x)))
    return torch.stack(out)


@pytest.mark.parametrize("module", ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"])
def test_mixing_equals_weighted_sum_of_peft_updates(stacked, peft_models, module):
    x = torch.randn(2, 5, 64)
    deltas = _peft_deltas(peft_models, module, x)
    layer = stacked.layers[module]
    token_w = torch.rand(2, 5, 4)
    expected = torch.einsum("bsk,kbso->bso", token_w, deltas)
    torch.testing.assert_close(layer.delta(x, token_w), expected, rtol=1e-5, atol=1e-5)
    example_w = torch.tensor([[0.0, 0.7, 0.3, 0.0], [0.5, 0.0, 0.0, 0.5]])
    expected = torch.einsum("bk,kbso->bso", example_w, deltas)
    torch.testing.assert_close(layer.delta(x, example_w), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta(x, example_w, merge=True), expected, rtol=1e-5, atol=1e-5)
    sparse = SparseRouting(torch.tensor([[1, 2], [0, 3]]), torch.tensor([[0.7, 0.3], [0.5, 0.5]]))
    torch.testing.assert_close(layer.delta(x, sparse), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta(x, sparse, merge=True), expected, rtol=1e-5, atol=1e-5)


def test_merge_equals_explicit_per_example_delta_w(stacked):
    layer = stacked.layers["model.layers.0.self_attn.q_proj"]
    w = torch.tensor([[0.2, 0.8, 0.0, 0.0], [0.0, 0.0, 0.4, 0.6]])
    delta_w = torch.einsum("bk,kor,kri->boi", w, layer.B, layer.A)
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(layer.delta(x, w, merge=True), torch.einsum("boi,bsi->bso", delta_w, x))


def test_detach_restores_base(tiny_base, experts):
    model, _ = load_tiny(tiny_base)
    ids = torch.randint(0, 200, (1, 4))
    before = model(ids).logits
    handle = attach_experts(model, {"a": experts["alpha"]})
    handle.set_weights(torch.ones(1, 1))
    assert not torch.allclose(model(ids).logits, before)
    handle.detach()
    torch.testing.assert_close(model(ids).logits, before)


def test_bad_folders_are_user_errors(tmp_path, tiny_base, experts):
    model, _ = load_tiny(tiny_base)
    with pytest.raises(MoergeError, match=r"adapter_config\.json"):
        attach_experts(model, [tmp_path])
    with pytest.raises(MoergeError, match="unique"):
        attach_experts(model, [experts["alpha"], experts["alpha"]])
    assert not hasattr(model, "moerge_routing")


def test_features_the_layer_cannot_apply_are_refused(tmp_path, tiny_base):
    from route_helpers import make_expert

    dora = make_expert(tiny_base, tmp_path / "dora", 0, r=2, target_modules=["q_proj"], use_dora=True)
    model, _ = load_tiny(tiny_base)
    with pytest.raises(MoergeError, match=r"use_dora is set .*the stacked-expert layer supports plain LoRA"):
        attach_experts(model, [dora])


def test_experts_of_another_base_are_refused(tmp_path, tiny_base, experts):
    import shutil

    from moerge.library.expert import read_expert_meta, write_expert_meta

    model, _ = load_tiny(tiny_base)
    for name, fp in (("one", "fp-one"), ("two", "fp-two")):
        shutil.copytree(experts["alpha"], tmp_path / name)
        meta = read_expert_meta(tmp_path / name)
        write_expert_meta(
            tmp_path / name, meta.model_copy(update={"base": meta.base.model_copy(update={"fingerprint": fp})})
        )
    with pytest.raises(MoergeError, match="different base models"):
        attach_experts(model, {"one": tmp_path / "one", "two": tmp_path / "two"})
    wide = load_tiny(tiny_base)[0]
    wide.model.layers[0].self_attn.q_proj = torch.nn.Linear(64, 32, bias=False)
    with pytest.raises(MoergeError, match=r"q_proj: the adapter's update is \(64, 64\).*layer is \(32, 64\)"):
        attach_experts(wide, [experts["alpha"]])


def test_attaching_twice_is_refused_until_detached(tiny_base, experts):
    model, _ = load_tiny(tiny_base)
    handle = attach_experts(model, [experts["alpha"]])
    with pytest.raises(MoergeError, match="already has experts"):
        attach_experts(model, [experts["beta"]])
    handle.detach()
    assert attach_experts(model, [experts["beta"]]).expert_names == ["beta"]
