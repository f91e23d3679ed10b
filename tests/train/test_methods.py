"""Partial fine-tuning (hft, bitfit, freeze_lower) and data-driven LoRA inits (olora, eva, corda, lora_ga)."""

import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_tiny_base, parity_rows, write_task
from moerge.errors import MoergeError
from moerge.recipes.train import train_expert
from moerge.train import TrainConfig, get_method
from moerge.train.methods.base import InitData
from moerge.train.methods.partial import hft_choice, layer_matrices

KINDS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
HAS_ATTRS = importlib.util.find_spec("attr") is not None


DATA_DRIVEN = {"eva", "corda", "lora_ga"}  # the methods that take `init_batches`


def _cfg(base, task, **kw) -> TrainConfig:
    defaults = {"steps": 2, "batch_size": 4, "max_length": 48, "lr": 1e-2, "eval_split": None}
    if kw.get("method") in DATA_DRIVEN:
        defaults["init_batches"] = 2
    return TrainConfig(base=str(base), task=task, **{**defaults, **kw})


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("base4"), layers=4)


@pytest.fixture
def parity(tmp_path):
    return write_task(tmp_path / "parity.jsonl", parity_rows(40))


def _base_weights(base) -> dict[str, torch.Tensor]:
    return load_file(str(base / "model.safetensors"))


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_hft_freezes_exactly_half_of_each_kind_and_seed_picks_which(four_layers):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(four_layers)
    cfg = TrainConfig(base=str(four_layers), task="x.jsonl", method="hft", seed=0)
    get_method("hft").prepare(model, cfg, four_layers, InitData())
    matrices = layer_matrices(model)
    assert set(matrices) == KINDS
    params = dict(model.named_parameters())
    for kind, by_layer in matrices.items():
        frozen = [i for i, name in by_layer.items() if not params[name].requires_grad]
        assert len(frozen) == 2 == len(by_layer) // 2, kind
    assert all(p.requires_grad for n, p in params.items() if "norm" in n or "embed" in n)
    choices = [hft_choice(model, seed) for seed in range(4)]
    assert all(set(c) == KINDS for c in choices)
    assert len({str(c) for c in choices}) == 4  # another seed freezes another half


def test_hft_training_leaves_the_frozen_half_untouched(four_layers, parity, tmp_path):
    meta = train_expert(_cfg(four_layers, parity, method="hft", seed=3), tmp_path / "h", progress=False)
    frozen = meta.hyperparameters["hft_frozen_layers"]
    assert frozen == hft_choice_from_folder(four_layers, 3)
    before, after = _base_weights(four_layers), load_file(str(tmp_path / "h" / "model.safetensors"))
    changed = _changed(before, after)
    for kind, layers in frozen.items():
        for layer in range(4):
            name = f"model.layers.{layer}.{'self_attn' if kind[0] in 'qkvo' else 'mlp'}.{kind}.weight"
            assert (name in changed) == (layer not in layers), name
    frozen_size = sum(before[k].numel() for k in before if k not in changed and k.endswith("proj.weight"))
    assert meta.cost["trainable_params"] == sum(t.numel() for t in before.values()) - frozen_size
    assert meta.kind == "full" and (tmp_path / "h" / "tokenizer.json").is_file()


def hft_choice_from_folder(base, seed):
    from transformers import AutoModelForCausalLM

    return hft_choice(AutoModelForCausalLM.from_pretrained(base), seed)


def test_bitfit_trains_only_norm_scales(tiny_base, parity, tmp_path):
    """Llama has no biases: BitFit trains the 1-D RMSNorm weights and nothing else."""
    meta = train_expert(_cfg(tiny_base, parity, method="bitfit"), tmp_path / "b", progress=False)
    before, after = _base_weights(tiny_base), load_file(str(tmp_path / "b" / "model.safetensors"))
    changed = _changed(before, after)
    norms = {k for k in before if "norm" in k}
    assert changed == norms
    assert meta.cost["trainable_params"] == sum(before[k].numel() for k in norms)


def test_freeze_lower_keeps_embeddings_and_lower_layers(four_layers, parity, tmp_path):
    meta = train_expert(
        _cfg(four_layers, parity, method="freeze_lower", freeze_layers=3), tmp_path / "f", progress=False
    )
    before, after = _base_weights(four_layers), load_file(str(tmp_path / "f" / "model.safetensors"))
    changed = _changed(before, after)
    assert changed and all(k.startswith("model.layers.3.") or k == "model.norm.weight" for k in changed)
    assert meta.hyperparameters["freeze_layers"] == 3
    with pytest.raises(MoergeError, match="freeze_layers"):
        train_expert(_cfg(four_layers, parity, method="freeze_lower", freeze_layers=9), tmp_path / "g", progress=False)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


RESIDUAL = ["olora", "lora_ga", pytest.param("corda", marks=pytest.mark.skipif(not HAS_ATTRS, reason="needs attrs"))]


@pytest.mark.parametrize("method", RESIDUAL)
def test_residual_inits_save_a_lora_for_the_original_base(tiny_base, parity, tmp_path, method):
    """The init moves B0·A0 out of W; the saved rank-2r LoRA must express only what training changed.

    With a negligible learning rate nothing changes, so the expert on the untouched base must act
    like the base itself (a missing conversion would add B0·A0 twice).
    """
    import json

    from moerge.library.loading import load_model

    ids = torch.randint(0, 200, (2, 12))
    base, _ = load_model(tiny_base)
    for lr, same in ((1e-12, True), (5e-2, False)):
        out = tmp_path / f"{method}-{lr}"
        train_expert(_cfg(tiny_base, parity, method=method, rank=4, lr=lr), out, progress=False)
        assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
        expert, _ = load_model(tiny_base, out)
        close = torch.allclose(_logits(expert, ids), _logits(base, ids), atol=1e-4)
        assert close == same, (method, lr)


def test_eva_initialises_a_from_the_input_activations(tiny_base, parity, tmp_path):
    """A's rows span the top principal directions of the layer's inputs on the init batches."""
    from moerge.data import load_task
    from moerge.data.prompts import collate
    from moerge.models import load_base
    from moerge.train.data import task_data

    cfg = _cfg(tiny_base, parity, method="eva", rank=4, lr=1e-12, target_modules=["q_proj"], init_batches=2)
    train_expert(cfg, tmp_path / "e", progress=False)
    a = load_file(str(tmp_path / "e" / "adapter_model.safetensors"))
    a0 = next(v for k, v in a.items() if "layers.0.self_attn.q_proj.lora_A" in k)

    model, tok = load_base(tiny_base)
    data = task_data([load_task(parity)], tok, cfg)
    seen = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    masks = []
    for step in range(cfg.method_options.init_batches):
        batch = collate([data.items[i] for i in data.batch_indices(step)], tok.pad_token_id)
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        masks.append(batch["attention_mask"].bool())
    hook.remove()
    x = torch.cat([h[m] for h, m in zip(seen, masks, strict=True)]).detach()
    _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    overlap = (a0 @ vh[:4].T).pow(2).sum() / 4  # 1.0 when A's rows span the top-4 directions
    assert overlap > 0.9, overlap


@pytest.mark.skipif(HAS_ATTRS, reason="attrs installed: corda works")
def test_corda_without_attrs_says_what_is_missing(tiny_base, parity, tmp_path):
    with pytest.raises(MoergeError, match="attrs"):
        train_expert(_cfg(tiny_base, parity, method="corda"), tmp_path / "c", progress=False)


@pytest.mark.skipif(not HAS_ATTRS, reason="needs attrs")
def test_corda_modes_move_different_components_out_of_w(tiny_base, parity, tmp_path):
    """Both modes leave W = W_residual + scale·B0·A0, but take different singular components."""
    from moerge.data import load_task
    from moerge.data.prompts import collate
    from moerge.models import load_base
    from moerge.train.data import task_data

    inits = []
    for mode in ("ipm", "kpm"):
        cfg = _cfg(tiny_base, parity, method="corda", corda_mode=mode, rank=4, target_modules=["v_proj"])
        model, tok = load_base(tiny_base)
        original = model.model.layers[0].self_attn.v_proj.weight.detach().clone()
        data = task_data([load_task(parity)], tok, cfg)
        batches = [collate([data.items[i] for i in data.batch_indices(s)], tok.pad_token_id) for s in range(2)]
        peft_model = get_method("corda").prepare(model, cfg, tmp_path / mode, InitData(batches, tok))
        layer = peft_model.base_model.model.model.layers[0].self_attn.v_proj
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        rebuilt = layer.base_layer.weight + layer.scaling["default"] * b @ a
        torch.testing.assert_close(rebuilt, original, atol=1e-4, rtol=1e-4)
        inits.append(a.detach())
    assert not torch.allclose(inits[0].abs(), inits[1].abs(), atol=1e-3)


def test_registry_has_the_recipe_methods():
    from moerge.train import METHODS

    assert {"hft", "bitfit", "freeze_lower", "olora", "eva", "corda", "lora_ga"} <= set(METHODS)
    assert get_method("hft").kind == get_method("bitfit").kind == get_method("freeze_lower").kind == "full"
