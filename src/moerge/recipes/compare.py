"""`moerge compare`: every strategy on the same experts and data — held-in, held-out, forgetting, cost.

Each (strategy, task) score is cached under a key made of what it depends on (strategy settings,
base fingerprint, the experts' file hashes, the task's data hash, the evaluation size), so a rerun
reuses finished work, a killed run resumes, and a changed expert invalidates exactly what used it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from moerge.data.task import Task
from moerge.paths import write_json_atomic
from moerge.recipes.protocol import CompareRecipe, Strategy

console = Console(stderr=True)
CACHE_VERSION = 1


@dataclass
class Workspace:
    """Everything strategies share: the base, the library, the experts and the loaded tasks."""

    recipe: CompareRecipe
    out: Path
    base_path: str
    base_fp: str
    library: Any
    experts: dict[str, Path]  # held-in task name → its expert folder (same name in the library)
    held_in: dict[str, Task]
    held_out: dict[str, Task]
    expert_hashes: dict[str, str] = field(default_factory=dict)

    def cache_path(self, strategy: Strategy, what: str, depends: dict[str, Any]) -> Path:
        key = json.dumps(
            {"v": CACHE_VERSION, "strategy": strategy.model_dump(), "base": self.base_fp, "what": what, **depends},
            sort_keys=True,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        return self.out / "cache" / f"{strategy.name}.{what.replace('/', '_')}.{digest}.json"

    def experts_key(self, strategy: Strategy, task: str | None = None) -> dict[str, str]:
        """The expert content a strategy's result depends on (none for the base)."""
        if strategy.kind == "base":
            return {}
        if strategy.kind == "oracle" and task is not None:
            return {task: self.expert_hashes.get(task, "")}
        return dict(self.expert_hashes)


def _cached(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    write_json_atomic(path, result)
    return result


@contextmanager
def peak_rss_window() -> Iterator[dict[str, float]]:
    """Peak resident memory inside the block (Linux: reset VmHWM first; elsewhere: process peak)."""
    import resource

    measured: dict[str, float] = {}
    with suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    try:
        yield measured
    finally:
        measured["peak_memory_mb"] = _vm_hwm_mb() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _vm_hwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def prepare_workspace(recipe: CompareRecipe, out: Path, *, progress: bool = True) -> Workspace:
    """Fetch the base, train (or reuse) the held-in experts, load every task with its training split."""
    from moerge.data.loaders import load_task
    from moerge.library import ExpertLibrary
    from moerge.models import fingerprint, resolve_base
    from moerge.recipes.library import LibraryRecipe, entry_config, train_library

    base_path = resolve_base(recipe.base)
    lib_recipe = LibraryRecipe(
        base=base_path,
        library=recipe.library,
        method=recipe.method,
        hyperparameters=recipe.hyperparameters,
        tasks=recipe.held_in,
    )
    console.print(f"[bold]experts[/bold]: {len(recipe.held_in)} held-in tasks → library {recipe.library}")
    train_library(lib_recipe, progress=progress)
    library = ExpertLibrary(recipe.library)
    held_in, experts, hashes = {}, {}, {}
    for entry in recipe.held_in:
        cfg = entry_config(lib_recipe, entry)
        name = entry.expert_name
        held_in[name] = load_task(entry.task, seed=cfg.seed, limit=cfg.limit)
        experts[name] = Path(library.path(name))
        hashes[name] = hashlib.sha256(json.dumps(library.meta(name).files, sort_keys=True).encode()).hexdigest()
    held_out = {entry.expert_name: load_task(entry.task) for entry in recipe.held_out}
    return Workspace(recipe, out, base_path, fingerprint(base_path), library, experts, held_in, held_out, hashes)


# ---- building each strategy's model ------------------------------------------------------------------


def _multitask_expert(ws: Workspace, strategy: Strategy) -> Path:
    """One adapter on the held-in mixture with the step budget of all experts together."""
    from moerge.recipes.library import ensure_expert
    from moerge.train.config import config_from_dict

    hp = dict(ws.recipe.hyperparameters)
    steps = int(hp.pop("steps", 100)) * len(ws.held_in)
    hp.update(strategy.options)
    cfg = config_from_dict(
        {
            **hp,
            "base": ws.base_path,
            "method": ws.recipe.method,
            "steps": steps,
            "tasks": [e.task for e in ws.recipe.held_in],
            "mixing": "proportional",
            "eval_split": None,
        },
        source=f"strategy {strategy.name!r}",
    )
    name = f"multitask-{cfg.fingerprint()[:8]}"
    console.print(f"multitask adapter {name}: {steps} steps on {len(ws.held_in)} tasks")
    ensure_expert(ws.library, name, cfg)
    return Path(ws.library.path(name))


def _merged_expert(ws: Workspace, strategy: Strategy) -> Path:
    from moerge.merge.config import ExpertRef, MergeSpec, OutputSpec
    from moerge.merge.run import run_merge

    digest = hashlib.sha256(json.dumps([strategy.model_dump(), ws.expert_hashes], sort_keys=True).encode())
    name = f"merge-{strategy.name}-{digest.hexdigest()[:8]}"
    if name not in ws.library.names():
        console.print(f"merging {len(ws.experts)} experts with {strategy.method} → {name}")
        run_merge(
            MergeSpec(
                method=strategy.method,
                library=ws.recipe.library,
                experts=[ExpertRef(name=n) for n in ws.experts],
                parameters=strategy.parameters,
                output=OutputSpec(kind="adapter", rank=strategy.rank, out=name),
            )
        )
    return Path(ws.library.path(name))


def _router_folder(ws: Workspace, strategy: Strategy) -> Path:
    from moerge.route import build_router

    digest = hashlib.sha256(json.dumps([strategy.model_dump(), ws.expert_hashes], sort_keys=True).encode())
    folder = ws.out / "routers" / f"{strategy.name}-{digest.hexdigest()[:8]}"
    if not (folder / "config.json").is_file():
        console.print(f"building router {strategy.router} over {len(ws.experts)} experts → {folder}")
        build_router(
            strategy.router,
            dict(ws.experts),
            folder,
            base=ws.base_path,
            policy=strategy.policy,
            options=strategy.options,
            library=ws.library,
            overwrite=True,
        )
    return folder


def load_strategy_model(ws: Workspace, strategy: Strategy, task: str | None = None) -> tuple[Any, Any, dict]:
    """(model, tokenizer, parameter counts) a strategy evaluates with; the oracle needs its task.

    Single adapters are merged into the weights for evaluation (same function, base-model speed);
    their size is read from the adapter file.
    """
    from moerge.library.loading import load_model
    from moerge.models import load_base

    if strategy.kind == "base":
        return (*load_base(ws.base_path), {"added_params": 0, "active_params": 0})
    if strategy.kind == "router":
        from moerge.route import load_routed

        model, tokenizer = load_base(ws.base_path)
        model = load_routed(model, _router_folder(ws, strategy), tokenizer=tokenizer)
        return model, tokenizer, routed_params(model)
    folder = {
        "oracle": lambda: ws.experts[task],
        "multitask": lambda: _multitask_expert(ws, strategy),
        "merge": lambda: _merged_expert(ws, strategy),
    }[strategy.kind]()
    from moerge.library.peft_import import count_parameters

    size = count_parameters(folder / "adapter_model.safetensors")
    return (*load_model(ws.base_path, folder, merge=True), {"added_params": size, "active_params": size})


def routed_params(model: Any) -> dict[str, int]:
    """Expert parameters held by the stacked layers, and the share a token uses under the policy."""
    handle = model.moerge_routing
    stacked = sum(int(layer.A.numel() + layer.B.numel()) for layer in handle.layers.values())
    policy = handle.routing.policy
    k = len(handle.expert_names) if policy.name == "dense" else min(policy.k, len(handle.expert_names))
    return {"added_params": stacked, "active_params": stacked * k // max(len(handle.expert_names), 1)}


# ---- scoring -------------------------------------------------------------------------------------------


class LazyModel:
    """Loads a strategy's model only when a cache miss needs it, and only once."""

    def __init__(self, ws: Workspace, strategy: Strategy, task: str | None = None):
        self.ws, self.strategy, self.task = ws, strategy, task
        self.loaded: tuple[Any, Any, dict] | None = None

    def get(self) -> tuple[Any, Any]:
        if self.loaded is None:
            self.loaded = load_strategy_model(self.ws, self.strategy, self.task)
        return self.loaded[0], self.loaded[1]

    @property
    def params(self) -> dict[str, int]:
        self.get()
        return self.loaded[2]


def _score_task(lazy: LazyModel, task: Task, name: str, limit: int | None) -> dict[str, Any]:
    from moerge.eval.evaluate import evaluate_task
    from moerge.route import routing_context

    model, tokenizer = lazy.get()
    with peak_rss_window() as memory:
        started = time.perf_counter()
        result = evaluate_task(
            model,
            tokenizer,
            task,
            split="test",
            limit=limit,
            batch_context=lambda n: routing_context(task_ids=[name] * n),
        )
        seconds = time.perf_counter() - started
    return {**result, "seconds": seconds, **memory, **lazy.params}


def _score_forgetting(lazy: LazyModel, ws: Workspace) -> dict[str, Any]:
    from moerge.data.loaders import load_task
    from moerge.eval.evaluate import evaluate_task
    from moerge.eval.forgetting import probe_texts, text_loss

    spec = ws.recipe.forgetting
    model, tokenizer = lazy.get()
    out: dict[str, Any] = {}
    if spec.probe:
        texts = probe_texts(load_task(spec.probe).test[: spec.limit])
        out["probe_loss"] = text_loss(model, tokenizer, texts)
    if spec.task:
        out["task_scores"] = evaluate_task(model, tokenizer, load_task(spec.task), limit=spec.limit)["scores"]
    return out


def _explain(lazy: LazyModel, ws: Workspace) -> dict[str, Any]:
    from moerge.route.explain import explain_routing, routing_accuracy

    model, tokenizer = lazy.get()
    limit = ws.recipe.explain_limit
    tasks = {name: task.test[:limit] for name, task in ws.held_in.items()}
    if lazy.strategy.router != "oracle":  # the oracle has no expert for unseen tasks
        tasks.update({name: task.test[:limit] for name, task in ws.held_out.items()})
    report = explain_routing(model, tokenizer, tasks)
    return {"report": report, "accuracy": routing_accuracy(report, {n: n for n in ws.held_in})}


def evaluate_strategy(ws: Workspace, strategy: Strategy) -> dict[str, Any]:
    """Scores of one strategy on every task, its forgetting and its routing; cached piece by piece."""
    limit = ws.recipe.eval_limit
    tasks: dict[str, Any] = {}
    forgetting: list[dict[str, Any]] = []
    shared = LazyModel(ws, strategy)
    for group, members in (("held_in", ws.held_in), ("held_out", ws.held_out)):
        for name, task in members.items():
            if strategy.kind == "oracle" and name not in ws.experts:
                continue
            lazy = LazyModel(ws, strategy, name) if strategy.kind == "oracle" else shared
            depends = {"experts": ws.experts_key(strategy, name), "data": task.data_hash(), "limit": limit}
            path = ws.cache_path(strategy, f"task/{name}", depends)
            tasks[name] = {
                "group": group,
                **_cached(path, lambda lazy=lazy, task=task, name=name: _score_task(lazy, task, name, limit)),
            }
            if strategy.kind == "oracle":
                forgetting.append(_forgetting_cached(ws, strategy, lazy, name))
    if strategy.kind != "oracle":
        forgetting.append(_forgetting_cached(ws, strategy, shared, None))
    routing = None
    if strategy.kind == "router":
        depends = {
            "experts": ws.experts_key(strategy),
            "limit": ws.recipe.explain_limit,
            "data": sorted(t.data_hash() for t in [*ws.held_in.values(), *ws.held_out.values()]),
        }
        routing = _cached(ws.cache_path(strategy, "routing", depends), lambda: _explain(shared, ws))
    return {"strategy": strategy.model_dump(), "tasks": tasks, "forgetting": forgetting, "routing": routing}


def _forgetting_cached(ws: Workspace, strategy: Strategy, lazy: LazyModel, task: str | None) -> dict[str, Any]:
    spec = ws.recipe.forgetting
    if not (spec.probe or spec.task):
        return {}
    depends = {"experts": ws.experts_key(strategy, task), "forgetting": spec.model_dump()}
    return _cached(ws.cache_path(strategy, f"forgetting/{task or 'all'}", depends), lambda: _score_forgetting(lazy, ws))


def expert_cost(meta: Any) -> dict[str, Any]:
    """What an expert cost to train, from its moerge.json."""
    keys = ("train_time_s", "trainable_params", "peak_memory_mb", "tokens_per_s")
    return {"method": meta.method, "steps": meta.hyperparameters.get("steps"), **{k: meta.cost.get(k) for k in keys}}


def run_compare(recipe: CompareRecipe, out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Prepare experts, evaluate every strategy, write results.json/.csv, report.md and report.html."""
    from moerge.recipes.report import summarise_results, write_reports

    out.mkdir(parents=True, exist_ok=True)
    ws = prepare_workspace(recipe, out, progress=progress)
    raw = []
    for i, strategy in enumerate(recipe.strategies, start=1):
        console.print(f"[bold][{i}/{len(recipe.strategies)}] strategy {strategy.name}[/bold] ({strategy.kind})")
        raw.append(evaluate_strategy(ws, strategy))
    results = summarise_results(raw, held_in=list(ws.held_in), held_out=list(ws.held_out))
    results["experts"] = {name: expert_cost(ws.library.meta(name)) for name in ws.held_in}
    results["recipe"] = recipe.model_dump()
    write_reports(results, out)
    return results
