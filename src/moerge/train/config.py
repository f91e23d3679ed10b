"""Training settings: one pydantic model shared by CLI options and YAML recipes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moerge.errors import MoergeError

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TrainConfig(BaseModel):
    """Everything that decides what an expert becomes. Unknown keys are errors (typos in recipes)."""

    model_config = ConfigDict(extra="forbid")

    base: str
    task: str
    method: str = "lora"
    name: str | None = Field(None, description="expert name; defaults to the task name")
    out: str | None = Field(None, description="expert folder to write (a recipe may set it)")
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))
    lr: float | None = Field(None, gt=0, description="learning rate; None picks the method's default")
    steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(256, ge=8)
    seed: int = 0
    limit: int | None = Field(None, ge=1, description="cap on the task's examples (all splits)")
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    checkpoint_every: int = Field(20, ge=1)
    eval_split: str | None = "test"
    eval_limit: int | None = Field(None, ge=1)

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_targets(cls, value: Any) -> Any:
        return [t.strip() for t in value.split(",") if t.strip()] if isinstance(value, str) else value

    def fingerprint(self) -> str:
        """Hash of the settings that change the result, to refuse resuming with different ones."""
        keep = self.model_dump(exclude={"checkpoint_every", "eval_split", "eval_limit", "name", "out"})
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def load_recipe(path: Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML recipe; CLI options given explicitly win over the file."""
    path = Path(path)
    if not path.is_file():
        raise MoergeError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise MoergeError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise MoergeError(f"{path}: a recipe is a mapping of settings (base, task, method, ...)")
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict[str, Any], *, source: str = "options") -> TrainConfig:
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "recipe"
        raise MoergeError(f"{source}: field {field!r}: {err['msg']}") from None
