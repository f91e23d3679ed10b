"""Training a whole library from one recipe: one expert per task, skipping finished ones.

`moerge train-library recipe.yaml` trains one expert per task entry into `library`. Example:

    base: HuggingFaceTB/SmolLM2-135M-Instruct
    library: ./experts            # relative paths are relative to the recipe file
    method: lora
    hyperparameters: {rank: 8, lr: 2.0e-4, steps: 200}
    tasks:
      - gym:chain_sum                              # shorthand: just the task spec
      - {task: gym:leg_counting, name: legs, overrides: {steps: 400}}

Each expert trains in a staging folder under $MOERGE_HOME (so an interrupted one resumes from its
checkpoint) and enters the library only when complete, through the library's atomic `add`.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moerge.data.formats import FormatField, PromptFormat
from moerge.errors import MoergeError
from moerge.library import ExpertLibrary
from moerge.library.library import validate_name
from moerge.paths import moerge_home
from moerge.progress import output_console
from moerge.recipes.train import train_expert
from moerge.train.config import TrainConfig, config_from_dict
from moerge.train.methods import METHODS
from moerge.yamlconf import Source, read_yaml, validate

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


class TaskEntry(BaseModel):
    """One expert to train: a task spec (as `moerge.data.load_task` reads it) and per-task overrides."""

    model_config = ConfigDict(extra="forbid")
    task: str = Field(min_length=1)
    name: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    prompt: FormatField | None = Field(
        None, description="the task's prompt format (preset, YAML file or mapping); wins over the recipe's"
    )

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str | None) -> str | None:
        if name is not None:
            try:
                validate_name(name)
            except MoergeError as exc:
                raise ValueError(str(exc)) from None
        return name

    @property
    def expert_name(self) -> str:
        """The given name, else one derived from the task spec ("gym:chain_sum" -> "gym-chain_sum")."""
        return self.name or _UNSAFE.sub("-", self.task).strip(".-")[:128] or "expert"


class LibraryConfig(BaseModel):
    """What `train-library` needs; unknown keys are errors so typos do not silently do nothing."""

    model_config = ConfigDict(extra="forbid")
    base: str = Field(min_length=1)
    library: str = Field(min_length=1)
    method: str = "lora"
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    prompt_format: FormatField | None = Field(None, description="prompt format of every task without its own")
    tasks: list[TaskEntry] = Field(min_length=1)

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method not in METHODS:
            raise ValueError(f"unknown training method {method!r}; known: {', '.join(METHODS.names())}")
        return method

    @field_validator("tasks", mode="before")
    @classmethod
    def _shorthand(cls, tasks: Any) -> Any:
        if isinstance(tasks, list):
            return [{"task": t} if isinstance(t, str) else t for t in tasks]
        return tasks

    @model_validator(mode="after")
    def _unique_names(self) -> LibraryConfig:
        seen: dict[str, int] = {}
        for i, entry in enumerate(self.tasks):
            if entry.expert_name in seen:
                raise ValueError(
                    f"tasks {seen[entry.expert_name]} and {i} both make expert {entry.expert_name!r}; "
                    "give one of them a `name`"
                )
            seen[entry.expert_name] = i
        return self

    def settings(self, entry: TaskEntry) -> dict[str, Any]:
        """Shared hyper-parameters with the task's overrides applied; the prompt format from (last
        wins) the hyper-parameters, the recipe's `prompt_format`, the overrides, the task's `prompt`."""
        return {
            **self.hyperparameters,
            **_format_setting(self.prompt_format),
            **entry.overrides,
            **_format_setting(entry.prompt),
        }


def _format_setting(fmt: PromptFormat | None) -> dict[str, Any]:
    return {} if fmt is None else {"prompt_format": fmt}


def load_library_config(path: str | Path) -> LibraryConfig:
    """Read a library recipe; errors name the file, the line and the field."""
    path = Path(path)
    raw, source = read_yaml(path, "library recipe")
    config = validate(LibraryConfig, raw, source)
    if "://" not in config.library and not Path(config.library).is_absolute():
        config = config.model_copy(update={"library": str((path.parent / config.library).resolve())})
    check_entries(config, source)
    return config


def check_entries(config: LibraryConfig, source: Source) -> None:
    """Build every expert's training settings now, so a bad hyper-parameter fails before any training,
    pointing at its line (the shared `hyperparameters`, or a task's `overrides`)."""
    first = config.tasks[0]
    entry_config(config, first.model_copy(update={"overrides": {}}), source.at("hyperparameters"))
    for index, entry in enumerate(config.tasks):
        entry_config(config, entry, source.at("tasks", index, "overrides"))


console = output_console(stderr=True)


def entry_config(config: LibraryConfig, entry: TaskEntry, source: Source | None = None) -> TrainConfig:
    """The training settings of one task's expert: shared hyper-parameters, then the task's overrides."""
    raw = {
        **config.settings(entry),
        "base": config.base,
        "task": entry.task,
        "method": config.method,
        "name": entry.expert_name,
    }
    return config_from_dict(raw, source or Source(f"library recipe, task {entry.expert_name!r}"))


def is_up_to_date(library: ExpertLibrary, name: str, cfg: TrainConfig) -> bool:
    """True when the library holds `name` trained with exactly these settings."""
    if name not in library.names():
        return False
    return library.meta(name).hyperparameters.get("config_hash") == cfg.fingerprint()


def staging_dir(library: ExpertLibrary, name: str) -> Path:
    key = hashlib.sha256(library.url.encode()).hexdigest()[:12]
    return moerge_home() / "staging" / key / name


def open_or_create(location: str) -> ExpertLibrary:
    try:
        return ExpertLibrary(location)
    except MoergeError:
        return ExpertLibrary.create(location)  # refuses, clearly, a non-empty folder that is not a library


def train_library(recipe: LibraryConfig, *, retrain: bool = False, progress: bool = True) -> dict[str, str]:
    """Train every expert the recipe lists into its library; returns name → 'trained' or 'reused'.

    An expert of the same name trained with other settings is refused before anything is trained,
    unless `retrain` (it may serve routers and merges built on it: replacing it is the user's call)."""
    library = open_or_create(recipe.library)
    configs = [(entry.expert_name, entry_config(recipe, entry)) for entry in recipe.tasks]
    if not retrain:
        for name, cfg in configs:
            check_not_replacing(library, name, cfg)
    outcome: dict[str, str] = {}
    for i, (name, cfg) in enumerate(configs, start=1):
        console.print(f"[{i}/{len(configs)}] {name}: {cfg.method} on {cfg.task}")
        outcome[name] = ensure_expert(library, name, cfg, retrain=retrain, progress=progress)
    return outcome


def check_not_replacing(library: ExpertLibrary, name: str, cfg: TrainConfig) -> None:
    """Refuse to train `name` over a library expert of that name that these settings did not make."""
    if name not in library.names() or is_up_to_date(library, name, cfg):
        return
    recorded = library.meta(name).hyperparameters
    changed = [
        f"{key} {value!r} → {getattr(cfg, key)!r}"
        for key, value in recorded.items()
        if key != "config_hash" and getattr(cfg, key, value) not in (value, None, "auto")  # auto: resolved later
    ]
    what = f"with other settings ({', '.join(changed)})" if changed else "with other settings"
    if "config_hash" not in recorded:
        what = "outside a recipe (imported or added by hand)"
    raise MoergeError(
        f"{library.url}: expert {name!r} is already there, trained {what}; pass --retrain to replace it, "
        "or give this task's expert another name (name: in the recipe)"
    )


def ensure_expert(
    library: ExpertLibrary, name: str, cfg: TrainConfig, *, retrain: bool = False, progress: bool = True
) -> str:
    """Train `cfg` into `library` as `name` unless it is there with the same settings: 'trained'/'reused'.
    Another expert of that name is replaced only when `retrain`."""
    if is_up_to_date(library, name, cfg):
        return "reused"
    if not retrain:
        check_not_replacing(library, name, cfg)
    stage = staging_dir(library, name)
    train_expert(cfg, stage, resume=True, overwrite=True, progress=progress)
    library.add(stage, name=name, overwrite=True)
    shutil.rmtree(stage, ignore_errors=True)
    return "trained"
