"""Training settings: one pydantic model shared by CLI options and YAML recipes.

A recipe is either one `TrainConfig` mapping, or a mapping with a `stages:` list; each stage is a
`TrainConfig` built from the recipe's top-level settings overridden by the stage's own keys.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moerge.errors import MoergeError
from moerge.yamlconf import read_yaml

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Fields added after experts were first trained: left out of the fingerprint while at their default,
# so the config_hash of experts trained before they existed stays valid.
_LATER_FIELDS = (
    "tasks", "mixing", "temperature", "weights", "per_task_loss", "type", "text", "start", "unlabelled",
    "confidence", "keep_top", "pseudo_steps", "init_batches", "freeze_layers", "corda_mode", "calibration_text",
)  # fmt: skip


class TrainConfig(BaseModel):
    """Everything that decides what an expert (or one stage of it) becomes. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    base: str
    task: str | None = Field(None, description="task spec to train on (finetune and self_train stages)")
    method: str = "lora"
    name: str | None = Field(None, description="expert name (a stage's name inside `stages:`)")
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
    limit: int | None = Field(None, ge=1, description="cap on each task's examples (all splits)")
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    checkpoint_every: int = Field(20, ge=1)
    eval_split: str | None = "test"
    eval_limit: int | None = Field(None, ge=1)
    # Multi-task mixing.
    tasks: list[str] | None = Field(None, description="several task specs trained together (instead of `task`)")
    mixing: Literal["concat", "proportional", "temperature", "weights"] = Field(
        "concat",
        description="concat: shuffle all examples together; proportional: sample tasks by size; "
        "temperature: by size^(1/temperature); weights: by `weights`",
    )
    temperature: float = Field(2.0, gt=0, description="T of temperature mixing (1 = proportional, large = uniform)")
    weights: list[float] | None = Field(None, description="one sampling weight per entry of `tasks` (mixing: weights)")
    per_task_loss: bool = Field(False, description="average the loss per task inside a batch, then over tasks")
    # Stages.
    type: Literal["finetune", "pretrain", "self_train"] = Field(
        "finetune", description="finetune on a task; pretrain: LM loss on raw `text`; self_train: pseudo labels"
    )
    text: list[str] | None = Field(None, description="raw text files (.txt, or .jsonl with a `text` field)")
    start: Literal["continue", "merge"] = Field(
        "continue",
        description="how a stage starts from the previous one: keep training its adapter, or merge it first",
    )
    unlabelled: str | None = Field(None, description="self_train pool: .txt (one input a line), .jsonl or a task")
    confidence: float = Field(0.0, ge=0, le=1, description="self_train: keep pseudo labels at least this confident")
    keep_top: float | None = Field(
        None, gt=0, le=1, description="self_train: then keep only this fraction of the pool, most confident first"
    )
    pseudo_steps: int | None = Field(None, ge=1, description="self_train: steps on the pseudo labels (default: epochs)")
    # Method options.
    init_batches: int = Field(4, ge=1, description="training batches shown to data-driven inits (eva, corda, lora_ga)")
    freeze_layers: int = Field(0, ge=0, description="freeze_lower: number of lowest decoder layers kept frozen")
    corda_mode: Literal["ipm", "kpm"] = Field(
        "ipm", description="corda: ipm (instruction-previewed, fits the task) or kpm (knowledge-preserving)"
    )
    calibration_text: list[str] | None = Field(
        None, description="corda kpm: general text whose activations should be preserved (default: task batches)"
    )

    @field_validator("target_modules", "tasks", "text", "calibration_text", mode="before")
    @classmethod
    def _split_lists(cls, value: Any) -> Any:
        return [t.strip() for t in value.split(",") if t.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _data_matches_type(self) -> TrainConfig:
        if self.type == "pretrain":
            if not self.text:
                raise ValueError("a pretrain stage needs `text`: raw text files (.txt or .jsonl with `text`)")
        elif (self.task is None) == (self.tasks is None):
            raise ValueError("give exactly one of `task` (one task) or `tasks` (a list, mixed by `mixing`)")
        if self.tasks is not None and not self.tasks:
            raise ValueError("`tasks` is empty")
        if self.mixing == "weights" and (self.weights is None or len(self.weights) != len(self.tasks or [])):
            raise ValueError("mixing: weights needs `weights` with one positive number per entry of `tasks`")
        if self.weights is not None and (min(self.weights) < 0 or sum(self.weights) <= 0):
            raise ValueError("`weights` must be non-negative with a positive sum")
        if self.type == "self_train" and not self.unlabelled:
            raise ValueError("a self_train stage needs `unlabelled`: a pool of inputs (.txt, .jsonl or a task)")
        return self

    @property
    def task_specs(self) -> list[str]:
        """The task specs this config trains on (empty for pretraining)."""
        return list(self.tasks) if self.tasks is not None else [self.task] if self.task else []

    def fingerprint(self) -> str:
        """Hash of the settings that change the result, to refuse resuming with different ones."""
        keep = self.model_dump(exclude={"checkpoint_every", "eval_split", "eval_limit", "name", "out"})
        defaults = TrainConfig.model_fields
        for key in _LATER_FIELDS:
            default = defaults[key].get_default(call_default_factory=True)
            if keep.get(key) == default:
                keep.pop(key)
        if keep.get("task") is None:
            keep.pop("task")
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


class Recipe(BaseModel):
    """A multi-stage recipe: stages run in order, each starting from the previous one's result."""

    model_config = ConfigDict(extra="forbid")
    base: str = Field(min_length=1)
    out: str | None = None
    name: str | None = None
    stages: list[TrainConfig] = Field(min_length=1)

    def fingerprint(self) -> str:
        parts = [stage.fingerprint() + stage.start for stage in self.stages]
        return hashlib.sha256(json.dumps([self.base, parts]).encode()).hexdigest()[:16]


def load_recipe(path: Path, overrides: dict[str, Any] | None = None) -> TrainConfig | Recipe:
    """Read a YAML recipe; CLI options given explicitly win over the file's top-level settings."""
    raw, _ = read_yaml(path, "training recipe")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "stages" in raw:
        return recipe_from_dict(raw, source=str(path), overrides=given)
    return config_from_dict({**raw, **given}, source=str(path))


def recipe_from_dict(raw: dict[str, Any], *, source: str = "recipe", overrides: dict[str, Any] | None = None) -> Recipe:
    """Build each stage from the top-level settings plus its own keys (then `overrides`, e.g. CLI options).

    A stage's seed defaults to the recipe's seed plus its index, so seeded choices (HFT's frozen
    half, data order) differ from stage to stage.
    """
    overrides = dict(overrides or {})
    raw = {**raw, **{k: overrides.pop(k) for k in ("base", "seed", "out", "name") if k in overrides}}
    stages = raw.pop("stages")
    if not isinstance(stages, list) or not stages:
        raise MoergeError(f"{source}: field 'stages': a non-empty list of stage mappings is expected")
    top = {k: raw.pop(k) for k in ("out", "name") if k in raw}
    built = []
    for index, stage in enumerate(stages):
        if not isinstance(stage, dict):
            raise MoergeError(f"{source}: stages[{index}]: a mapping of settings is expected")
        if "base" in stage:
            raise MoergeError(f"{source}: stages[{index}]: `base` is set once, at the top of the recipe")
        merged = {**raw, "seed": raw.get("seed", 0) + index, **stage, **overrides}
        merged.setdefault("name", f"stage{index + 1}")
        for key, other in (("task", "tasks"), ("tasks", "task")):
            if other not in stage and (key in stage or merged.get("type") == "pretrain"):
                merged.pop(other, None)  # a stage's own data replaces the recipe's default
        built.append(config_from_dict(merged, source=f"{source}: stages[{index}]"))
    try:
        return Recipe(base=raw.get("base", ""), stages=built, **top)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise MoergeError(f"{source}: field {'.'.join(map(str, err['loc']))!r}: {err['msg']}") from None


def config_from_dict(raw: dict[str, Any], *, source: str = "options") -> TrainConfig:
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "recipe"
        raise MoergeError(f"{source}: field {field!r}: {err['msg']}") from None
