"""The strategy registry: specs are typed per kind, wrong options are one line with the recipe's line,
and every kind loads through `load_strategy` (the same path compare, eval and generate take)."""

from __future__ import annotations

import pytest
import torch
import yaml
from pydantic import BaseModel

from moerge.errors import MoergeError
from moerge.recipes.compare import load_compare_config
from moerge.recipes.strategies import (
    STRATEGIES,
    Loaded,
    MergeOptions,
    StrategySpec,
    Workspace,
    load_strategy,
    register_strategy,
)


def _recipe(tmp_path, strategies) -> str:
    path = tmp_path / "compare.yaml"
    raw = {"base": "b", "held_in": ["gym:leg_counting"], "strategies": strategies}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_shorthands_expand_to_typed_specs():
    assert StrategySpec.model_validate("base").options.model_dump() == {}
    ties = StrategySpec.model_validate("ties")
    assert (ties.kind, ties.name) == ("merge", "ties") and isinstance(ties.options, MergeOptions)
    arrow = StrategySpec.model_validate("arrow")
    assert (arrow.kind, arrow.options.router) == ("router", "arrow")
    assert StrategySpec.model_validate("multitask").options.hyperparameters == {}


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        (
            {"name": "soup", "kind": "merge", "method": "linear", "parameters": {"density": 0.2}},
            r"parameters: density: not an option of merge method 'linear' "
            r"\(its options: scaling, lines_alpha, lines_beta\)",
        ),
        (
            {"name": "a", "kind": "router", "router": "arrow", "options": {"steps": 3}},
            r"options: steps: not an option of router 'arrow' \(its options: none\)",
        ),
        ({"name": "p", "kind": "router", "router": "phatgoose", "policy": {"k": 0}}, r"policy: k: "),
        ({"name": "r", "kind": "router"}, "give exactly one of `router` .* or `path`"),
        (
            {"name": "x", "kind": "merge", "method": "ties", "density": 0.2},
            "density: not an option of strategy kind 'merge'",
        ),
        ({"name": "x", "kind": "blend"}, "unknown strategy kind 'blend'"),
        ("tiez", "unknown strategy 'tiez'"),
    ],
)
def test_bad_strategies_are_one_line_at_their_recipe_line(tmp_path, strategy, message):
    path = _recipe(tmp_path, ["base", strategy])
    with pytest.raises(MoergeError, match=rf"compare\.yaml:6: strategies\.1: .*{message}") as info:
        load_compare_config(path)
    assert "\n" not in str(info.value)


def test_base_and_expert_load_through_the_registry(tiny_base, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.1)
    model.save_pretrained(tmp_path / "adapter")
    ws = Workspace(base=str(tiny_base))
    base = load_strategy(StrategySpec.model_validate({"kind": "base"}), ws)
    expert = load_strategy(StrategySpec.model_validate({"kind": "expert", "path": str(tmp_path / "adapter")}), ws)
    size = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert (base.added_params, expert.added_params, expert.active_params) == (0, size, size)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert not torch.allclose(base.model(input_ids=ids).logits, expert.model(input_ids=ids).logits)
    with pytest.raises(MoergeError, match="oracle: needs experts"):
        load_strategy(StrategySpec.model_validate("oracle"), ws, "parity")


def test_a_new_kind_is_one_function_and_one_registration(tiny_base):
    class Scaled(BaseModel):
        factor: float = 1.0

    @register_strategy("test_scaled_base", options=Scaled, experts_used="none")
    def load_scaled(spec, ws, task):
        from moerge.models import load_base

        model, tokenizer = load_base(ws.base)
        return Loaded(model, tokenizer, info={"factor": spec.options.factor})

    try:
        spec = StrategySpec.model_validate({"name": "s", "kind": "test_scaled_base", "factor": 2})
        assert spec.key_dict() == {"name": "s", "kind": "test_scaled_base", "factor": 2.0}
        assert load_strategy(spec, Workspace(base=str(tiny_base))).info == {"factor": 2.0}
        with pytest.raises(ValueError, match="already registered"):
            register_strategy("test_scaled_base", options=Scaled)(load_scaled)
    finally:
        STRATEGIES._entries.pop("test_scaled_base")
