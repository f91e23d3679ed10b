"""Training a whole library from one recipe: one expert per task, skipping finished ones.

Each expert trains in a staging folder under $MOERGE_HOME (so an interrupted one resumes from its
checkpoint) and enters the library only when complete, through the library's atomic `add`.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from rich.console import Console

from moerge.errors import MoergeError
from moerge.library import ExpertLibrary
from moerge.library.recipe import LibraryRecipe, TaskEntry
from moerge.paths import moerge_home
from moerge.train.config import TrainConfig, config_from_dict
from moerge.train.loop import train_expert

console = Console(stderr=True)


def entry_config(recipe: LibraryRecipe, entry: TaskEntry) -> TrainConfig:
    raw = {
        **recipe.settings(entry),
        "base": recipe.base,
        "task": entry.task,
        "method": recipe.method,
        "name": entry.expert_name,
    }
    return config_from_dict(raw, source=f"recipe task {entry.expert_name!r}")


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


def train_library(recipe: LibraryRecipe, *, progress: bool = True) -> dict[str, str]:
    """Train every expert the recipe lists into its library; returns name → 'trained' or 'reused'."""
    library = open_or_create(recipe.library)
    configs = [(entry.expert_name, entry_config(recipe, entry)) for entry in recipe.tasks]
    outcome: dict[str, str] = {}
    for i, (name, cfg) in enumerate(configs, start=1):
        console.print(f"[{i}/{len(configs)}] {name}: {cfg.method} on {cfg.task}")
        outcome[name] = ensure_expert(library, name, cfg, progress=progress)
    return outcome


def ensure_expert(library: ExpertLibrary, name: str, cfg: TrainConfig, *, progress: bool = True) -> str:
    """Train `cfg` into `library` as `name` unless it is there with the same settings: 'trained'/'reused'."""
    if is_up_to_date(library, name, cfg):
        return "reused"
    stage = staging_dir(library, name)
    train_expert(cfg, stage, resume=True, overwrite=True, progress=progress)
    library.add(stage, name=name, overwrite=True)
    shutil.rmtree(stage, ignore_errors=True)
    return "trained"
