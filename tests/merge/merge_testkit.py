"""Helpers for merge tests: tiny LoRA experts (mixed ranks, alphas, targets) and peft's own deltas.

Imported by tests/merge/conftest.py and, through its file path, by tests/cli/test_merge_cli.py.
"""

from __future__ import annotations

from pathlib import Path

from moerge.library.expert import BaseInfo, ExpertMeta, TaskInfo, write_expert_meta

# name → LoraConfig kwargs: different ranks, alphas, rsLoRA, patterns and target modules.
EXPERTS = {
    "a": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "b": {"r": 2, "lora_alpha": 4, "use_rslora": True, "target_modules": ["q_proj", "v_proj", "o_proj"]},
    "c": {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["v_proj", "up_proj"],
        "rank_pattern": {"layers.0.self_attn.v_proj": 3},
        "alpha_pattern": {"layers.1.self_attn.v_proj": 5},
    },
}


def make_lora(folder: Path, base: Path, *, seed: int, fingerprint: str | None = None, **lora: object) -> Path:
    """A peft LoRA adapter of `base` with random non-zero A and B; with moerge.json if fingerprinted."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(std=0.2)
    model.save_pretrained(folder)
    if fingerprint is not None:
        meta = ExpertMeta(
            name=folder.name,
            method="lora",
            task=TaskInfo(name=f"task-{folder.name}"),
            base=BaseInfo(name_or_path=str(base), fingerprint=fingerprint),
        )
        write_expert_meta(folder, meta)
    return folder


def peft_deltas(base: Path, folder: Path) -> dict[str, object]:
    """peft's own Δ per module (`get_delta_weight`), keyed like the base's module names."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)
    return {
        name.removeprefix("base_model.model."): module.get_delta_weight("default").detach()
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }
