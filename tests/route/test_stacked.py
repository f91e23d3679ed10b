"""The stacked-expert layer against peft applying each LoRA on its own."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from route_helpers import load_tiny

from moerge.errors import MoergeError
from moerge.route.stacked import SparseRouting, attach_experts, load_lora_factors

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


def test_rank_and_alpha_patterns_follow_peft(experts):
    factors = load_lora_factors(experts["gamma"])
    a0, _ = factors.modules["model.layers.0.self_attn.v_proj"]
    assert a0.shape[0] == 3


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


def test_attaching_twice_is_refused_until_detached(tiny_base, experts):
    model, _ = load_tiny(tiny_base)
    handle = attach_experts(model, [experts["alpha"]])
    with pytest.raises(MoergeError, match="already has experts"):
        attach_experts(model, [experts["beta"]])
    handle.detach()
    assert attach_experts(model, [experts["beta"]]).expert_names == ["beta"]
