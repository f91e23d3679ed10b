"""Reading LoRA experts for merging: safetensors and JSON only, no model is built.

A module's task vector is Δ = s·B·A with s = α/r (α/√r for rsLoRA), honouring peft's
`rank_pattern`/`alpha_pattern`. Factors are read lazily, one module at a time, so merging holds
one module's worth of expert updates, not whole experts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from moerge.errors import MoergeError
from moerge.library.expert import ExpertMeta, check_expert_intact, is_expert_folder
from moerge.paths import parse_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")
_UNSUPPORTED = ("use_dora", "modules_to_save", "trainable_token_indices")


@dataclass
class LoraExpert:
    """One LoRA expert folder, opened for reading factors module by module."""

    folder: Path
    label: str
    config: dict[str, Any]
    meta: ExpertMeta | None
    _factors: dict[str, dict[str, str]] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, folder: Path, label: str | None = None) -> LoraExpert:
        folder = Path(folder)
        config_path = folder / ADAPTER_CONFIG
        if not config_path.is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
            raise MoergeError(f"{folder}: not a LoRA expert (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
        meta = check_expert_intact(folder) if is_expert_folder(folder) else None
        config = parse_json(config_path.read_bytes(), config_path)
        if config.get("peft_type", "LORA") != "LORA":
            raise MoergeError(f"{config_path}: peft_type {config.get('peft_type')!r}: only LORA merges")
        for key in _UNSUPPORTED:
            if config.get(key):
                raise MoergeError(f"{config_path}: {key} is set; merging supports plain LoRA updates only")
        expert = cls(folder, label or folder.name, config, meta)
        expert._index_factors()
        return expert

    def _index_factors(self) -> None:
        with safe_open(self.folder / ADAPTER_WEIGHTS, framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                match = _KEY.match(key)
                if not match:
                    raise MoergeError(f"{self.folder / ADAPTER_WEIGHTS}: tensor {key!r} is not a LoRA A/B factor")
                self._factors.setdefault(match["module"], {})[match["part"]] = key
        for module, parts in self._factors.items():
            if set(parts) != {"A", "B"}:
                raise MoergeError(f"{self.folder / ADAPTER_WEIGHTS}: {module} lacks lora_A or lora_B")

    @property
    def modules(self) -> list[str]:
        return sorted(self._factors)

    @property
    def fingerprint(self) -> str:
        return self.meta.base.fingerprint if self.meta else "unknown"

    @cached_property
    def _reader(self) -> Any:
        return safe_open(self.folder / ADAPTER_WEIGHTS, framework="pt")

    def scaling(self, module: str, rank: int) -> float:
        """peft's scaling for `module`: pattern-matched alpha over r (or √r with rsLoRA)."""
        alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", 8))
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(s·A, B) in float32, so that Δ = B @ (s·A); None if the expert does not touch `module`."""
        if module not in self._factors:
            return None
        keys = self._factors[module]
        a = self._reader.get_tensor(keys["A"]).float()
        b = self._reader.get_tensor(keys["B"]).float()
        return a * self.scaling(module, a.shape[0]), b

    @property
    def fan_in_fan_out(self) -> bool:
        """True for Conv1D-style layers (GPT-2) whose weight is stored as (in, out)."""
        return bool(self.config.get("fan_in_fan_out"))

    def shape(self, module: str) -> tuple[int, int]:
        """Shape of Δ for `module`, from factor shapes alone."""
        keys = self._factors[module]
        return (
            self._reader.get_slice(keys["B"]).get_shape()[0],
            self._reader.get_slice(keys["A"]).get_shape()[1],
        )

    def rank(self, module: str) -> int:
        return self._reader.get_slice(self._factors[module]["A"]).get_shape()[0]


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's `get_pattern_key`: a pattern matches a module name ending in `.pattern`."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def open_experts(folders: dict[str, Path]) -> list[LoraExpert]:
    """Open every expert (label → folder) and refuse a mix of base models."""
    if not folders:
        raise MoergeError("experts: no experts given")
    experts = [LoraExpert.open(folder, label=label) for label, folder in folders.items()]
    check_same_base(experts)
    check_same_shapes(experts)
    if len({e.fan_in_fan_out for e in experts}) > 1:
        raise MoergeError("experts: mix of fan_in_fan_out and regular layouts (different base models)")
    return experts


def check_same_base(experts: list[LoraExpert]) -> None:
    known = {e.label: e.fingerprint for e in experts if e.fingerprint != "unknown"}
    if len(set(known.values())) > 1:
        listing = ", ".join(f"{label}={fp[:12]}" for label, fp in known.items())
        raise MoergeError(f"experts: trained on different base models (base.fingerprint: {listing})")


def check_same_shapes(experts: list[LoraExpert]) -> None:
    """Experts with the same module but different layer shapes cannot share a base."""
    seen: dict[str, tuple[tuple[int, int], str]] = {}
    for expert in experts:
        for module in expert.modules:
            shape = expert.shape(module)
            first = seen.setdefault(module, (shape, expert.label))
            if first[0] != shape:
                raise MoergeError(
                    f"experts: {module} is {first[0]} in {first[1]} but {shape} in {expert.label}"
                    " (different base models)"
                )


def union_modules(experts: list[LoraExpert]) -> list[str]:
    return sorted({m for e in experts for m in e.modules}, key=_natural_key)


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
