"""Turn a plain peft adapter folder (trained anywhere, no `moerge.json`) into a moerge expert folder.

peft records the method and its shape (rank, alpha, targets) but not the task, the data, metrics or
cost; those are filled from the caller or marked "unknown". The base is checked by fingerprint so an
adapter is never filed under a base it was not trained on.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from moerge.errors import MoergeError
from moerge.library.expert import BaseInfo, ExpertMeta, TaskInfo
from moerge.models import fingerprint
from moerge.paths import parse_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
UNKNOWN = "unknown"


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / CONFIG_FILE
    if not path.is_file():
        raise MoergeError(f"{path}: not found (expected a peft adapter folder saved with save_pretrained)")
    config = parse_json(path.read_bytes(), path)
    if not isinstance(config, dict):
        raise MoergeError(f"{path}: expected a JSON object")
    if not (adapter_dir / WEIGHTS_FILE).is_file():
        raise MoergeError(
            f"{adapter_dir / WEIGHTS_FILE}: not found (pickle-based adapter_model.bin is not read; "
            "re-save the adapter with safe_serialization=True)"
        )
    return config


def method_of(config: dict[str, Any]) -> str:
    """lora / dora / rslora for LoRA adapters, else peft's own type name in lower case."""
    peft_type = str(config.get("peft_type", UNKNOWN)).lower()
    if peft_type != "lora":
        return peft_type
    if config.get("use_dora"):
        return "dora"
    return "rslora" if config.get("use_rslora") else "lora"


def hyperparameters_of(config: dict[str, Any]) -> dict[str, Any]:
    fields = {
        "rank": "r",
        "alpha": "lora_alpha",
        "targets": "target_modules",
        "dropout": "lora_dropout",
        "init": "init_lora_weights",
    }
    out = {ours: config.get(theirs, UNKNOWN) for ours, theirs in fields.items()}
    if isinstance(out["targets"], (list, set, tuple)):
        out["targets"] = sorted(out["targets"])
    return out


def count_parameters(weights: Path) -> int:
    """Parameters in the adapter file, from the safetensors header (no tensors loaded)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as fh:
        return sum(math.prod(fh.get_slice(key).get_shape()) for key in fh.keys())  # noqa: SIM118


def check_base(config: dict[str, Any], base: str, base_fingerprint: str, source: Path) -> str:
    """Compare the adapter's recorded base with `base`; refuse a mismatch, note when it cannot be checked."""
    claimed = config.get("base_model_name_or_path")
    if not claimed:
        return "not checked: adapter_config.json names no base model"
    if claimed == base:
        return "matches adapter_config.json base_model_name_or_path"
    try:
        claimed_fingerprint = fingerprint(claimed)
    except (MoergeError, OSError) as exc:
        return f"not checked: adapter_config.json base {claimed!r} could not be resolved ({exc})"
    if claimed_fingerprint != base_fingerprint:
        raise MoergeError(
            f"{source / CONFIG_FILE}: base_model_name_or_path {claimed!r} "
            f"(fingerprint {claimed_fingerprint[:12]}) is not the base {base!r} "
            f"(fingerprint {base_fingerprint[:12]}); pass the base it was trained on"
        )
    return f"fingerprint matches adapter_config.json base {claimed!r}"


def peft_meta(adapter_dir: Path, *, task: str, base: str, name: str) -> ExpertMeta:
    """The `moerge.json` content for a plain peft adapter: known fields filled, the rest 'unknown'."""
    config = read_adapter_config(adapter_dir)
    base_fingerprint = fingerprint(base)
    return ExpertMeta(
        name=name,
        kind="adapter",
        method=method_of(config),
        task=TaskInfo(name=task),
        base=BaseInfo(name_or_path=base, fingerprint=base_fingerprint),
        hyperparameters=hyperparameters_of(config),
        cost={"trainable_params": count_parameters(adapter_dir / WEIGHTS_FILE)},
        provenance={
            "imported_from": str(adapter_dir.resolve()),
            "peft_version": config.get("peft_version", UNKNOWN),
            "base_check": check_base(config, base, base_fingerprint, adapter_dir),
            "data": UNKNOWN,
        },
    )


def stage_peft_files(adapter_dir: Path, dest: Path) -> None:
    """Copy only what peft needs to load the adapter (config and safetensors weights)."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(adapter_dir.iterdir()):
        if path.name == CONFIG_FILE or (path.is_file() and path.suffix == ".safetensors"):
            shutil.copy2(path, dest / path.name)
