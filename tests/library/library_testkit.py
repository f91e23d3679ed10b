"""Helpers for library tests: tiny random peft LoRA adapters and expert folders made from them.

Imported by tests/library/* directly and by tests/cli/test_library_cli.py through its file path
(no conftest.py here, so the root conftest stays the only `conftest` module).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from moerge.errors import MoergeError
from moerge.library import ExpertMeta, write_expert_meta
from moerge.library.expert import BaseInfo, TaskInfo

BASE = "tiny-llama"
FINGERPRINTS = {BASE: "fp-tiny", "/models/tiny-llama": "fp-tiny", "/models/other": "fp-other"}


def tiny_llama_config():
    """The tiny random Llama every library test adapter is made for."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )


def make_adapter(folder: Path, *, seed: int = 0, **lora: object) -> Path:
    """Save a plain peft LoRA adapter (non-zero lora_B) for a tiny random Llama."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = tiny_llama_config()
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **lora}
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(**options))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    model.save_pretrained(folder)
    return folder


def make_expert(folder: Path, adapter: Path, *, name: str, task: str = "add", **fields: object) -> Path:
    """Copy `adapter` into `folder` and write its moerge.json (an expert as moerge would train it)."""
    shutil.copytree(adapter, folder)
    meta = ExpertMeta(
        name=name,
        method=fields.pop("method", "lora"),
        task=TaskInfo(name=task),
        base=BaseInfo(name_or_path=BASE, fingerprint="fp-tiny"),
        hyperparameters={"rank": 4, "alpha": 8},
        **fields,
    )
    write_expert_meta(folder, meta)
    return folder


def fake_layer_shapes(name_or_path: str) -> dict[str, tuple[int, ...]]:
    """Stands in for moerge.models.loading.base_layer_shapes: the fake bases (`FINGERPRINTS`) are the tiny
    Llama every test adapter is made for; anything else is read from its folder."""
    from torch import nn
    from transformers import LlamaForCausalLM

    from moerge.models.loading import base_layer_shapes

    if name_or_path not in FINGERPRINTS:
        return base_layer_shapes(name_or_path)
    model = LlamaForCausalLM(tiny_llama_config())
    return {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def fake_fingerprint(name_or_path: str) -> str:
    """Stands in for moerge.models.fingerprint: known bases resolve, anything else cannot."""
    if name_or_path not in FINGERPRINTS:
        raise MoergeError(f"{name_or_path}: model not found")
    return FINGERPRINTS[name_or_path]
