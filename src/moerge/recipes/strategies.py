"""Strategies: the ways of using experts that `compare`, `eval` and `generate` load (and `serve` will).

A strategy kind is one loader function plus its options model, registered with `@register_strategy`;
`load_strategy(spec, workspace)` turns a spec into a loaded model. In a recipe a strategy is a mapping
`{name, kind, <the kind's options>}` (or a shorthand string: a kind with no options, a merge method's
name or a router's name):

    - base                                            # the base model alone
    - {name: ties, kind: merge, method: ties, parameters: {density: 0.2}, rank: 16}
    - {name: arrow, kind: router, router: arrow, policy: {name: top_k, k: 2}}
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, model_serializer, model_validator

from moerge.data.formats import MIXED, Recorded
from moerge.errors import MoergeError
from moerge.progress import output_console
from moerge.registry import Registry
from moerge.yamlconf import Source, an_option_of, first_error

console = output_console(stderr=True)
ExpertsUsed = Literal["none", "own", "all"]


@dataclass
class Workspace:
    """What strategies share: the base model and, in a comparison, the library, the held-in experts
    (task name → folder, with a hash of each expert's files), the training settings a multitask
    adapter reuses, and `out`, where built routers are kept."""

    base: str
    library: Any = None
    experts: dict[str, Path] = field(default_factory=dict)
    expert_hashes: dict[str, str] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)  # method, hyperparameters, tasks (multitask)
    out: Path | None = None

    def expert_folders(self, what: str) -> dict[str, Path]:
        if not self.experts:
            raise MoergeError(f"{what}: needs experts (a comparison's held-in experts)")
        return dict(self.experts)

    def digest(self, spec: StrategySpec) -> str:
        """Short hash of the spec and the experts it combines: names what a strategy builds."""
        blob = json.dumps([spec.key_dict(), self.expert_hashes], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]


@dataclass
class Loaded:
    """A strategy ready to score: the model, its tokenizer, the parameters it adds to the base, the
    share of them one token uses (routers use k of K experts) and the prompt format its experts were
    trained with (None for the base; see `moerge.data.formats.scoring_format`)."""

    model: Any
    tokenizer: Any
    added_params: int = 0
    active_params: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    prompt_format: Recorded | None = None

    @property
    def params(self) -> dict[str, int]:
        return {"added_params": self.added_params, "active_params": self.active_params}


Loader = Callable[["StrategySpec", Workspace, "str | None"], Loaded]


@dataclass(frozen=True)
class StrategyKind:
    """A registered kind. `experts_used` says what its scores depend on (none, each task's own expert,
    or all experts), so cached scores are invalidated exactly; `per_task` kinds (the oracle) load one
    model per held-in task; `routed` kinds can explain their routing."""

    name: str
    options: type[BaseModel]
    load: Loader
    experts_used: ExpertsUsed = "all"
    per_task: bool = False
    routed: bool = False


STRATEGIES: Registry[StrategyKind] = Registry("strategy kind")


def register_strategy(
    kind: str,
    *,
    options: type[BaseModel],
    experts_used: ExpertsUsed = "all",
    per_task: bool = False,
    routed: bool = False,
) -> Callable[[Loader], Loader]:
    def register(load: Loader) -> Loader:
        STRATEGIES.register(kind, StrategyKind(kind, options, load, experts_used, per_task, routed))
        return load

    return register


class StrategySpec(BaseModel):
    """One strategy of a recipe: its name, kind and the kind's typed options (given flat in YAML)."""

    model_config = ConfigDict(frozen=True)
    name: str = Field(min_length=1)
    kind: str
    options: SerializeAsAny[BaseModel]

    @model_validator(mode="before")
    @classmethod
    def _typed_options(cls, raw: Any) -> Any:
        if isinstance(raw, str):
            raw = expand_shorthand(raw)
        if not isinstance(raw, dict) or ("options" in raw and isinstance(raw["options"], BaseModel)):
            return raw
        rest = {k: v for k, v in raw.items() if k not in ("name", "kind")}
        with _as_value_error():
            kind = STRATEGIES.get(str(raw.get("kind")), field="kind")
        unknown = sorted(set(rest) - set(kind.options.model_fields))
        if unknown:
            raise ValueError(f"{unknown[0]}: not {an_option_of(f'strategy kind {kind.name!r}', kind.options)}")
        name = raw.get("name", kind.name)
        try:
            options = kind.options.model_validate(rest)
        except ValidationError as exc:
            raise ValueError(str(first_error(Source("options"), exc)).removeprefix("options: ")) from None
        return {"name": name, "kind": kind.name, "options": options}

    @property
    def registered(self) -> StrategyKind:
        return STRATEGIES.get(self.kind)

    @model_serializer
    def key_dict(self) -> dict[str, Any]:
        """The spec as plain data, in the flat form a recipe writes (so a dump reads back): what cached
        scores and built artefacts are keyed on."""
        return {"name": self.name, "kind": self.kind, **self.options.model_dump(mode="json")}

    def content_key(self) -> dict[str, str]:
        """What the strategy reads from a folder of its own (`path`: an expert or a router), by content,
        so a folder changed in place is scored again."""
        path = getattr(self.options, "path", None)
        return {"path": folder_digest(Path(path))} if path else {}


def folder_digest(folder: Path) -> str:
    """sha256 over a folder's files (relative path and content)."""
    if not folder.is_dir():
        raise MoergeError(f"{folder}: folder not found")
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(file.relative_to(folder).as_posix().encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def expand_shorthand(name: str) -> dict[str, Any]:
    """A kind without options, a merge method or a router name → a full strategy mapping."""
    from moerge.merge.methods import MERGE_METHODS
    from moerge.route import router_names

    if name in STRATEGIES and _all_defaults(STRATEGIES.get(name).options):
        return {"name": name, "kind": name}
    if name in MERGE_METHODS:
        return {"name": name, "kind": "merge", "method": name}
    if name in router_names():
        return {"name": name, "kind": "router", "router": name}
    plain = [n for n, k in STRATEGIES.items() if _all_defaults(k.options)]
    known = [*plain, *MERGE_METHODS.names(), *router_names()]
    raise ValueError(f"unknown strategy {name!r}; known: {', '.join(known)}")


def _all_defaults(options: type[BaseModel]) -> bool:
    """A kind whose options all have defaults can be named alone (`- multitask`)."""
    return not any(f.is_required() for f in options.model_fields.values())


def load_strategy(spec: StrategySpec, workspace: Workspace, task: str | None = None) -> Loaded:
    """The strategy's model on the workspace's base; per-task kinds (the oracle) need `task`."""
    return spec.registered.load(spec, workspace, task)


# ---- the built-in kinds -----------------------------------------------------------------------------


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExpertOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str = Field(description="expert folder: a moerge expert, a merge, or any peft adapter (safetensors)")


class MultitaskOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict, description="training settings that override the comparison's own"
    )


class MergeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    method: str = Field(description="merge method (see `moerge merge --help`)")
    parameters: dict[str, Any] = Field(default_factory=dict, description="the merge method's options")
    rank: int | None = Field(None, ge=1, description="rank of the merged adapter (SVD); exact when unset")

    @model_validator(mode="after")
    def _method_takes_parameters(self) -> MergeOptions:
        """Refuse an unknown method or a parameter it does not take when the recipe is read."""
        from moerge.merge.methods import MERGE_METHODS

        with _as_value_error():
            MERGE_METHODS.get(self.method, field="method").parse_options(self.parameters, Source("parameters"))
        return self


class RouterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    router: str | None = Field(None, description="router to build over the experts (see `moerge route build`)")
    policy: dict[str, Any] = Field(default_factory=dict, description="selection policy overrides (k, granularity ...)")
    options: dict[str, Any] = Field(default_factory=dict, description="the router's own options")
    path: str | None = Field(None, description="an existing router folder, instead of building one")

    @model_validator(mode="after")
    def _router_or_folder(self) -> RouterOptions:
        from moerge.route import get_router, parse_policy

        if (self.router is None) == (self.path is None):
            raise ValueError("give exactly one of `router` (build one) or `path` (a router folder)")
        if self.router is not None:
            with _as_value_error():
                router = get_router(self.router, field="router")
                router.parse_options(self.options, Source("options"))
                parse_policy({**router.default_policy.to_dict(), **self.policy}, Source("policy"))
        return self

    @property
    def routes_unseen_tasks(self) -> bool:
        """The oracle needs each example's own expert, so it has nothing to route a held-out task to."""
        return self.router != "oracle"


@contextmanager
def _as_value_error() -> Iterator[None]:
    """Inside a pydantic validator: a MoergeError becomes a ValueError, so it gets the recipe's file:line."""
    try:
        yield
    except MoergeError as exc:
        raise ValueError(str(exc)) from None


def _adapter_loaded(ws: Workspace, folder: Path, info: dict[str, Any] | None = None) -> Loaded:
    """An adapter folded into the base weights: the same function at the base model's speed."""
    from moerge.library.adapter import open_adapter
    from moerge.library.loading import load_model

    adapter = open_adapter(folder)
    size = adapter.parameter_count
    model, tokenizer = load_model(ws.base, folder, merge=True)
    return Loaded(model, tokenizer, size, size, {"folder": str(folder), **(info or {})}, adapter.prompt_format)


@register_strategy("base", options=NoOptions, experts_used="none")
def load_base_strategy(spec: StrategySpec, ws: Workspace, task: str | None) -> Loaded:
    """The base model alone: the reference every other strategy is measured against."""
    from moerge.models import load_base

    return Loaded(*load_base(ws.base))


@register_strategy("expert", options=ExpertOptions)
def load_expert_strategy(spec: StrategySpec, ws: Workspace, task: str | None) -> Loaded:
    """One expert folder on the base: a moerge expert (adapter or full model) or any peft adapter."""
    from moerge.library.expert import is_expert_folder, read_expert_meta, recorded_format
    from moerge.library.loading import load_model

    folder = Path(spec.options.path)
    if is_expert_folder(folder) and (meta := read_expert_meta(folder)).kind in ("full", "mixture"):
        return Loaded(*load_model(ws.base, folder), info={"folder": str(folder)}, prompt_format=recorded_format(meta))
    return _adapter_loaded(ws, folder)


@register_strategy("oracle", options=NoOptions, experts_used="own", per_task=True)
def load_oracle(spec: StrategySpec, ws: Workspace, task: str | None) -> Loaded:
    """Each held-in task scored by its own expert: the upper bound routers aim at."""
    experts = ws.expert_folders("oracle")
    if task not in experts:
        raise MoergeError(f"oracle: task {task!r} has no expert (experts: {', '.join(experts)})")
    return _adapter_loaded(ws, experts[task])


@register_strategy("multitask", options=MultitaskOptions)
def load_multitask(spec: StrategySpec, ws: Workspace, task: str | None) -> Loaded:
    """One adapter trained on the held-in mixture with the step budget of all experts together."""
    from moerge.recipes.library import ensure_expert
    from moerge.train.config import config_from_dict

    tasks = list(ws.training.get("tasks") or [])
    if not tasks or ws.library is None:
        raise MoergeError("multitask: needs a comparison's held-in tasks and library")
    if ws.training.get("prompt_format") == MIXED:
        raise MoergeError("multitask: the held-in tasks use different prompt formats; one adapter trains in one")
    hyper = dict(ws.training.get("hyperparameters") or {})
    steps = int(hyper.pop("steps", 100)) * len(tasks)
    hyper.update(spec.options.hyperparameters)
    raw = {
        **hyper,
        "base": ws.base,
        "method": ws.training.get("method", "lora"),
        "steps": steps,
        "tasks": tasks,
        "mixing": "proportional",
        "eval_split": None,
        "prompt_format": ws.training.get("prompt_format"),
    }
    cfg = config_from_dict(raw, source=f"strategy {spec.name!r}")
    name = f"multitask-{cfg.fingerprint()[:8]}"
    console.print(f"multitask adapter {name}: {steps} steps on {len(tasks)} tasks")
    ensure_expert(ws.library, name, cfg)
    return _adapter_loaded(ws, Path(ws.library.path(name)))


@register_strategy("merge", options=MergeOptions)
def load_merge(spec: StrategySpec, ws: Workspace, task: str | None) -> Loaded:
    """The experts merged into one adapter (kept in the library, reused while the experts are unchanged)."""
    from moerge.merge.config import ExpertRef, MergeSpec, OutputSpec
    from moerge.merge.run import run_merge

    experts = ws.expert_folders(f"merge strategy {spec.name!r}")
    if ws.library is None:
        raise MoergeError(f"merge strategy {spec.name!r}: needs a library to keep the merged adapter in")
    name = f"merge-{spec.name}-{ws.digest(spec)}"
    if name not in ws.library.names():
        console.print(f"merging {len(experts)} experts with {spec.options.method} → {name}")
        run_merge(
            MergeSpec(
                method=spec.options.method,
                library=ws.library.url,
                experts=[ExpertRef(name=n) for n in experts],
                parameters=spec.options.parameters,
                output=OutputSpec(kind="adapter", rank=spec.options.rank, out=name),
            )
        )
    return _adapter_loaded(ws, Path(ws.library.path(name)))


@register_strategy("router", options=RouterOptions, routed=True)
def load_router(spec: StrategySpec, ws: Workspace, task: str | None) -> Loaded:
    """The experts behind a router (built over the workspace's experts, or read from a folder)."""
    from moerge.models import load_base
    from moerge.route import load_routed

    folder = Path(spec.options.path) if spec.options.path else _built_router(spec, ws)
    model, tokenizer = load_base(ws.base)
    model = load_routed(model, folder, tokenizer=tokenizer)
    added, active = model.moerge_routing.routing.parameter_counts()
    return Loaded(model, tokenizer, added, active, {"folder": str(folder)}, model.moerge_routing.prompt_format)


def _built_router(spec: StrategySpec, ws: Workspace) -> Path:
    from moerge.route import build_router

    experts = ws.expert_folders(f"router strategy {spec.name!r}")
    if ws.out is None:
        raise MoergeError(f"router strategy {spec.name!r}: needs a folder to build the router in")
    folder = ws.out / "routers" / f"{spec.name}-{ws.digest(spec)}"
    if not (folder / "config.json").is_file():
        console.print(f"building router {spec.options.router} over {len(experts)} experts → {folder}")
        build_router(
            str(spec.options.router),
            experts,
            folder,
            base=ws.base,
            policy=spec.options.policy,
            options=spec.options.options,
            library=ws.library,
            overwrite=True,
        )
    return folder
