"""What `moerge compare` compares: the recipe (tasks, forgetting probe, strategies) as pydantic models.

A strategy is a way of using the experts: `base`, `oracle` (each task's own expert), `multitask` (one
adapter on the held-in mixture, same step budget as all experts together), a merge (any method of
`moerge.merge`) or a router (any router of `moerge.route`). Strings are shorthand: a merge method's
or a router's name gives it with default settings.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moerge.recipes.library import TaskEntry
from moerge.yamlconf import load_config

StrategyKind = Literal["base", "oracle", "multitask", "merge", "router"]


class Strategy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    kind: StrategyKind
    method: str | None = Field(None, description="merge method (kind merge)")
    parameters: dict[str, Any] = Field(default_factory=dict, description="merge parameters, e.g. density")
    rank: int | None = Field(None, description="merged adapter rank (kind merge)")
    router: str | None = Field(None, description="router name (kind router)")
    policy: dict[str, Any] = Field(default_factory=dict, description="selection policy overrides (kind router)")
    options: dict[str, Any] = Field(default_factory=dict, description="router options (kind router)")

    @model_validator(mode="after")
    def _complete(self) -> Strategy:
        if self.kind == "merge" and not self.method:
            raise ValueError(f"strategy {self.name!r}: kind merge needs `method`")
        if self.kind == "router" and not self.router:
            raise ValueError(f"strategy {self.name!r}: kind router needs `router`")
        return self

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:16]


class Forgetting(BaseModel):
    """General ability of the base: LM loss on a text probe and accuracy on a general task."""

    model_config = ConfigDict(extra="forbid")
    probe: str | None = Field(None, description="task spec whose input+target texts are the LM-loss probe")
    task: str | None = Field(None, description="task spec scored before/after for accuracy")
    limit: int = Field(64, ge=1)


class CompareRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: str
    library: str = "library"
    method: str = "lora"
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    held_in: list[TaskEntry] = Field(min_length=1)
    held_out: list[TaskEntry] = Field(default_factory=list)
    forgetting: Forgetting = Field(default_factory=Forgetting)
    eval_limit: int | None = Field(100, ge=1)
    explain_limit: int = Field(16, ge=1, description="examples per task for the routing heatmap/accuracy")
    strategies: list[Strategy] = Field(min_length=1)

    @field_validator("held_in", "held_out", mode="before")
    @classmethod
    def _task_shorthand(cls, tasks: Any) -> Any:
        return [{"task": t} if isinstance(t, str) else t for t in tasks] if isinstance(tasks, list) else tasks

    @field_validator("strategies", mode="before")
    @classmethod
    def _strategy_shorthand(cls, strategies: Any) -> Any:
        return (
            [expand_strategy(s) if isinstance(s, str) else s for s in strategies]
            if isinstance(strategies, list)
            else strategies
        )

    @model_validator(mode="after")
    def _disjoint(self) -> CompareRecipe:
        held_in = {t.task for t in self.held_in}
        leaked = [t.task for t in self.held_out if t.task in held_in]
        if leaked:
            raise ValueError(f"held-out task {leaked[0]!r} is also held-in; held-out tasks must be unseen")
        names = [s.name for s in self.strategies]
        if len(set(names)) != len(names):
            raise ValueError("strategy names must be unique")
        return self


def expand_strategy(name: str) -> dict[str, Any]:
    """`base`, `oracle`, `multitask`, a merge method or a router name → a full strategy."""
    from moerge.merge.methods import MERGE_METHODS
    from moerge.route import router_names

    if name in ("base", "oracle", "multitask"):
        return {"name": name, "kind": name}
    if name in MERGE_METHODS:
        return {"name": name, "kind": "merge", "method": name}
    if name in router_names():
        return {"name": name, "kind": "router", "router": name}
    known = ["base", "oracle", "multitask", *sorted(MERGE_METHODS), *router_names()]
    raise ValueError(f"unknown strategy {name!r}; known: {', '.join(known)}")


def load_compare_recipe(path: Path) -> CompareRecipe:
    """Read a compare recipe; errors name file, line and field; `library` is relative to the file."""
    path = Path(path)
    recipe = load_config(path, CompareRecipe, "compare recipe")
    if "://" not in recipe.library and not Path(recipe.library).is_absolute():
        recipe = recipe.model_copy(update={"library": str((path.parent / recipe.library).resolve())})
    return recipe
