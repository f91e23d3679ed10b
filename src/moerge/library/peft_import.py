"""Turn a plain peft adapter folder (trained anywhere, no `moerge.json`) into a moerge expert folder.

peft records the method and its shape (rank, alpha, targets) but not the task, the data, metrics or
cost; those are filled from the caller or marked "unknown". The base is checked by fingerprint so an
adapter is never filed under a base it was not trained on, and everything is validated before anything
is written: the config's types (the one reader, `open_adapter`), every tensor's values (finite), and a
LoRA's factor shapes against the base's layers (read from the base's safetensors headers).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from moerge.data.formats import PromptFormat
from moerge.errors import MoergeError
from moerge.library.adapter import (
    ADAPTER_CONFIG,
    UNKNOWN,
    AdapterConfig,
    LoraAdapter,
    LoraAdapterConfig,
    PeftAdapter,
    open_adapter,
)
from moerge.library.expert import BaseInfo, ExpertMeta, TaskInfo
from moerge.models import fingerprint
from moerge.models.loading import base_layer_shapes


def method_of(config: AdapterConfig) -> str:
    """lora / dora / rslora for LoRA adapters, else peft's own type name in lower case."""
    if not isinstance(config, LoraAdapterConfig):
        return config.peft_type.lower()
    if config.use_dora:
        return "dora"
    return "rslora" if config.use_rslora else "lora"


def hyperparameters_of(config: AdapterConfig) -> dict[str, Any]:
    """Rank, alpha, targets, dropout and init as the config gives them ("unknown" where it has none)."""
    fields = {
        "rank": "r",
        "alpha": "lora_alpha",
        "targets": "target_modules",
        "dropout": "lora_dropout",
        "init": "init_lora_weights",
    }
    values = config.model_dump(mode="json")
    out = {ours: values.get(theirs, UNKNOWN) for ours, theirs in fields.items()}
    if isinstance(out["targets"], list):
        out["targets"] = sorted(out["targets"])
    return out


def check_base(adapter: PeftAdapter, base: str, base_fingerprint: str) -> str:
    """Compare the adapter's recorded base with `base`; refuse a mismatch, note when it cannot be checked."""
    claimed = adapter.config.base_model_name_or_path
    if not claimed:
        return f"not checked: {ADAPTER_CONFIG} names no base model"
    if claimed == base:
        return f"matches {ADAPTER_CONFIG} base_model_name_or_path"
    try:
        claimed_fingerprint = fingerprint(claimed)
    except (MoergeError, OSError) as exc:
        return f"not checked: {ADAPTER_CONFIG} base {claimed!r} could not be resolved ({exc})"
    if claimed_fingerprint != base_fingerprint:
        raise MoergeError(
            f"{adapter.config_path}: base_model_name_or_path {claimed!r} "
            f"(fingerprint {claimed_fingerprint[:12]}) is not the base {base!r} "
            f"(fingerprint {base_fingerprint[:12]}); pass the base it was trained on"
        )
    return f"fingerprint matches {ADAPTER_CONFIG} base {claimed!r}"


def peft_meta(
    adapter_dir: Path, *, task: str, base: str, name: str, prompt_format: PromptFormat | None = None
) -> ExpertMeta:
    """The `moerge.json` content for a plain peft adapter: known fields filled, the rest 'unknown'
    (the prompt format too, unless the caller knows how the adapter was trained)."""
    adapter = open_adapter(adapter_dir, name)
    base_fingerprint = fingerprint(base)
    if isinstance(adapter, LoraAdapter):
        adapter.check_layers(base_layer_shapes(base), base=f"--base {base}")
    adapter.check_values()
    return ExpertMeta(
        name=name,
        kind="adapter",
        method=method_of(adapter.config),
        task=TaskInfo(name=task),
        base=BaseInfo(name_or_path=base, fingerprint=base_fingerprint),
        hyperparameters=hyperparameters_of(adapter.config),
        cost={"trainable_params": adapter.parameter_count},
        prompt_format=prompt_format or "unknown",
        provenance={
            "imported_from": str(adapter_dir.resolve()),
            "peft_version": adapter.config.peft_version or UNKNOWN,
            "base_check": check_base(adapter, base, base_fingerprint),
            "data": UNKNOWN,
        },
    )


def stage_peft_files(adapter_dir: Path, dest: Path) -> None:
    """Copy only what peft needs to load the adapter (config and safetensors weights)."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(adapter_dir.iterdir()):
        if path.name == ADAPTER_CONFIG or (path.is_file() and path.suffix == ".safetensors"):
            shutil.copy2(path, dest / path.name)
