"""The one adapter reader: peft's own scaling and defaults, type-checked configs, no pickles, shape checks."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from library_testkit import make_adapter, make_expert, tiny_llama_config

from moerge.errors import MoergeError
from moerge.library.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraAdapter,
    PeftAdapter,
    check_same_shapes,
    open_adapter,
)

# name → LoraConfig kwargs covering alpha/r, rsLoRA's alpha/√r, rank_pattern and alpha_pattern.
LORAS = {
    "plain": {"r": 4, "lora_alpha": 8},
    "rslora": {"r": 4, "lora_alpha": 6, "use_rslora": True, "target_modules": ["q_proj", "o_proj"]},
    "patterns": {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["v_proj", "up_proj"],
        "rank_pattern": {"layers.0.self_attn.v_proj": 3},
        "alpha_pattern": {"layers.1.self_attn.v_proj": 5, "up_proj": 2.5},
    },
}


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {name: make_adapter(root / name, seed=i, **spec) for i, (name, spec) in enumerate(LORAS.items())}


def tiny_model(**overrides: object) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    config = tiny_llama_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    return LlamaForCausalLM(config)


def peft_layers(folder: Path) -> dict[str, torch.nn.Module]:
    """peft's own LoRA layers for the adapter, keyed like the base model's module names."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_model(), folder)
    return {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }


def with_config(src: Path, dest: Path, **changes: object) -> Path:
    """A copy of `src` whose adapter_config.json has `changes` (a value of ... removes the key)."""
    shutil.copytree(src, dest)
    config = json.loads((dest / ADAPTER_CONFIG).read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not ...}
    (dest / ADAPTER_CONFIG).write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize("name", list(LORAS))
def test_ranks_scalings_and_updates_are_peft_own(name: str, loras: dict[str, Path]) -> None:
    adapter = LoraAdapter.open(loras[name])
    layers = peft_layers(loras[name])
    assert adapter.modules == sorted(layers)
    for module, layer in layers.items():
        assert adapter.rank(module) == layer.r["default"]
        assert adapter.scaling(module) == layer.scaling["default"]
        a, b = adapter.factors(module)
        torch.testing.assert_close(b @ a, layer.get_delta_weight("default"))
        assert adapter.shape(module) == tuple(layer.get_delta_weight("default").shape)
    assert adapter.factors("model.layers.0.mlp.gate_proj") is None


def test_rslora_and_patterns_are_what_they_claim(loras: dict[str, Path]) -> None:
    rslora, patterns = LoraAdapter.open(loras["rslora"]), LoraAdapter.open(loras["patterns"])
    assert rslora.scaling("model.layers.0.self_attn.q_proj") == 6 / math.sqrt(4)
    assert patterns.rank("model.layers.0.self_attn.v_proj") == 3
    assert patterns.scaling("model.layers.0.self_attn.v_proj") == 16 / 3
    assert patterns.scaling("model.layers.1.self_attn.v_proj") == 5 / 8
    assert patterns.scaling("model.layers.1.mlp.up_proj") == 2.5 / 8


def test_missing_rank_and_alpha_take_peft_defaults(tmp_path: Path) -> None:
    from peft import LoraConfig

    src = make_adapter(tmp_path / "src", r=LoraConfig().r, lora_alpha=3)
    bare = with_config(src, tmp_path / "bare", r=..., lora_alpha=...)
    adapter = LoraAdapter.open(bare)
    assert (adapter.config.r, adapter.config.lora_alpha) == (LoraConfig().r, LoraConfig().lora_alpha)
    module, layer = next(iter(peft_layers(bare).items()))
    assert adapter.scaling(module) == layer.scaling["default"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"r": "eight"}, "r: Input should be a valid integer"),
        ({"r": 0}, "r: Input should be greater than 0"),
        ({"lora_alpha": "x"}, "lora_alpha: expected a number, got str"),
        ({"target_modules": 42}, "target_modules: expected a module name regex or a list of module names, got 42"),
        ({"rank_pattern": {"q_proj": "2"}}, r"rank_pattern\.q_proj: Input should be a valid integer"),
        ({"use_rslora": "yes"}, "use_rslora: Input should be a valid boolean"),
        ({"peft_type": 3}, "peft_type: Input should be a valid string"),
        ({"peft_type": ...}, "peft_type: Field required"),
    ],
)
def test_config_type_errors_name_the_file_and_field(
    tmp_path: Path, loras: dict[str, Path], change: dict, message: str
) -> None:
    folder = with_config(loras["plain"], tmp_path / "bad", **change)
    with pytest.raises(MoergeError, match=rf"^{tmp_path / 'bad' / ADAPTER_CONFIG}: {message}") as raised:
        open_adapter(folder)
    assert "\n" not in str(raised.value)


def test_not_a_json_object_is_refused(tmp_path: Path, loras: dict[str, Path]) -> None:
    folder = tmp_path / "list"
    shutil.copytree(loras["plain"], folder)
    (folder / ADAPTER_CONFIG).write_text("[1, 2]")
    with pytest.raises(MoergeError, match=r"adapter_config\.json: expected a JSON object, got list"):
        LoraAdapter.open(folder)


def test_pickled_weights_are_refused_unread(tmp_path: Path, loras: dict[str, Path]) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(loras["plain"], folder)
    (folder / ADAPTER_WEIGHTS).unlink()
    (folder / "adapter_model.bin").write_bytes(b"not a pickle: unpickling this would raise")
    refusal = r"adapter_model\.bin: pickle weights are not read .*safe_serialization=True\)$"
    with pytest.raises(MoergeError, match=refusal):
        open_adapter(folder)
    (folder / "adapter_model.bin").unlink()
    with pytest.raises(MoergeError, match=rf"{ADAPTER_WEIGHTS}: not found"):
        open_adapter(folder)
    with pytest.raises(MoergeError, match=rf"{ADAPTER_CONFIG}: not found"):
        open_adapter(tmp_path)


def test_corrupt_weights_and_ranks_that_disagree_with_the_config(tmp_path: Path, loras: dict[str, Path]) -> None:
    corrupt = tmp_path / "corrupt"
    shutil.copytree(loras["plain"], corrupt)
    (corrupt / ADAPTER_WEIGHTS).write_bytes(b"\x00" * 16)
    with pytest.raises(MoergeError, match="not a readable safetensors file"):
        open_adapter(corrupt)
    wrong = with_config(loras["plain"], tmp_path / "wrong", r=2)
    with pytest.raises(
        MoergeError, match=r"q_proj: lora_A/lora_B have ranks 4/4, but adapter_config\.json gives rank 2"
    ):
        LoraAdapter.open(wrong)


def test_expert_files_are_checked_and_meta_exposed(tmp_path: Path, loras: dict[str, Path]) -> None:
    expert = make_expert(tmp_path / "expert", loras["plain"], name="adder")
    adapter = LoraAdapter.open(expert)
    assert (adapter.label, adapter.fingerprint, adapter.meta.task.name) == ("adder", "fp-tiny", "add")
    assert LoraAdapter.open(expert, label="mine").label == "mine"
    plain = LoraAdapter.open(loras["plain"])
    assert (plain.label, plain.fingerprint, plain.meta) == ("plain", "unknown", None)
    config = json.loads((expert / ADAPTER_CONFIG).read_text())
    (expert / ADAPTER_CONFIG).write_text(json.dumps({**config, "lora_alpha": 99}))
    with pytest.raises(MoergeError, match="sha256 mismatch"):
        LoraAdapter.open(expert)


def test_parameter_count_comes_from_the_header(loras: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    for folder in loras.values():
        expected = sum(t.numel() for t in load_file(folder / ADAPTER_WEIGHTS).values())
        assert LoraAdapter.open(folder).parameter_count == expected


def test_any_peft_adapter_opens_and_only_loras_as_lora(tmp_path: Path) -> None:
    from peft import IA3Config, get_peft_model

    model = get_peft_model(
        tiny_model(), IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    )
    model.save_pretrained(tmp_path / "ia3")
    ia3 = open_adapter(tmp_path / "ia3")
    assert type(ia3) is PeftAdapter and ia3.config.peft_type == "IA3"
    assert ia3.parameter_count == sum(p.numel() for n, p in model.named_parameters() if "ia3_" in n)
    with pytest.raises(MoergeError, match="peft_type 'IA3': not a LoRA adapter"):
        LoraAdapter.open(tmp_path / "ia3")


def test_features_are_refused_only_where_they_cannot_be_applied(tmp_path: Path, loras: dict[str, Path]) -> None:
    dora = open_adapter(make_adapter(tmp_path / "dora", use_dora=True, r=2, lora_alpha=4))
    assert isinstance(dora, LoraAdapter) and dora.parameter_count > 0  # loading and importing read it
    with pytest.raises(MoergeError, match=r"adapter_config\.json: use_dora is set \(DoRA .*\); merging supports"):
        dora.require_plain("merging")
    adapter = LoraAdapter.open(with_config(loras["plain"], tmp_path / "fan", fan_in_fan_out=True))
    with pytest.raises(MoergeError, match="fan_in_fan_out is set"):
        adapter.require_plain("routing")
    assert adapter.require_plain("merging", allow={"fan_in_fan_out"}) is adapter


def test_other_tensors_are_refused_for_factor_users(tmp_path: Path, loras: dict[str, Path]) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "embedding"
    shutil.copytree(loras["plain"], folder)
    weights = load_file(folder / ADAPTER_WEIGHTS)
    weights["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 128)
    save_file(weights, folder / ADAPTER_WEIGHTS)
    adapter = LoraAdapter.open(folder)
    with pytest.raises(MoergeError, match=r"tensor 'base_model\.model\.model\.embed_tokens\.lora_embedding_A' is not"):
        adapter.require_plain("merging")


def test_check_against_the_base_model(loras: dict[str, Path]) -> None:
    adapter = LoraAdapter.open(loras["plain"])
    assert adapter.check_against(tiny_model()) == {m: m for m in adapter.modules}
    assert adapter.check_against(tiny_model().model) == {m: m.removeprefix("model.") for m in adapter.modules}
    narrow = tiny_model(num_key_value_heads=1)
    with pytest.raises(MoergeError, match=r"v_proj: the adapter's update is \(32, 64\) \(out, in\), .* is \(16, 64\)"):
        adapter.check_against(narrow)
    with pytest.raises(MoergeError, match=r"model\.layers\.1\.self_attn\.q_proj: not in the base model"):
        adapter.check_against(tiny_model(num_hidden_layers=1))
    swapped = tiny_model()
    swapped.model.layers[0].self_attn.q_proj = torch.nn.Identity()
    with pytest.raises(MoergeError, match=r"layers\.0\.self_attn\.q_proj: .* the base model's layer is Identity"):
        adapter.check_against(swapped)


def test_same_shapes_across_experts(tmp_path: Path, loras: dict[str, Path]) -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(num_key_value_heads=1), LoraConfig(r=4, target_modules=["v_proj"]))
    model.save_pretrained(tmp_path / "narrow")
    plain, narrow = LoraAdapter.open(loras["plain"]), LoraAdapter.open(tmp_path / "narrow")
    with pytest.raises(MoergeError, match=r"v_proj is \(32, 64\) in plain but \(16, 64\) in narrow"):
        check_same_shapes([plain, narrow])
