"""Routing test helpers: tiny LoRA experts with mixed ranks, rsLoRA, rank/alpha patterns, missing modules."""

from __future__ import annotations

from pathlib import Path

from moerge.data.task import Example

# name → LoraConfig kwargs. "gamma" lacks q_proj, "delta" lacks v_proj: each is a zero expert there.
EXPERT_SPECS = {
    "alpha": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "beta": {"r": 2, "lora_alpha": 4, "use_rslora": True, "target_modules": ["q_proj", "v_proj", "o_proj"]},
    "gamma": {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["v_proj"],
        "rank_pattern": {"layers.0.self_attn.v_proj": 3},
        "alpha_pattern": {"layers.1.self_attn.v_proj": 5},
    },
    "delta": {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj"]},
}

TASK_WORDS = {
    "alpha": "apple banana cherry",
    "beta": "one two three four",
    "gamma": "red green blue",
    "delta": "north south east west",
}


def task_examples(name: str, n: int = 6) -> list[Example]:
    words = TASK_WORDS[name].split()
    return [Example(f"{name} {words[i % len(words)]} {i}", words[(i + 1) % len(words)]) for i in range(n)]


def load_tiny(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def make_expert(base: Path, out: Path, seed: int, meta_task: str | None = None, **lora_kwargs) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    model, _ = load_tiny(base)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(out)
    if meta_task:
        from moerge.library.expert import BaseInfo, ExpertMeta, TaskInfo, write_expert_meta

        meta = ExpertMeta(
            name=out.name,
            method="lora",
            task=TaskInfo(name=meta_task, source=meta_task),
            base=BaseInfo(name_or_path=str(base)),
        )
        write_expert_meta(out, meta)
    return out


def other_base(tiny_base: Path, out: Path) -> Path:
    """A copy of the tiny base with shifted weights: a different fingerprint, same shapes."""
    import torch

    model, tokenizer = load_tiny(tiny_base)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
