"""`moerge compare`: every strategy on the same experts and data — held-in, held-out, forgetting, cost.

The recipe names a base, the held-in tasks (each gets an expert, trained into the library or reused),
held-out tasks (no expert), a forgetting probe and the strategies (`moerge.recipes.strategies`). Each
(strategy, task) score is cached under a key made of what it depends on (the strategy's settings, the
base fingerprint, the experts' file hashes, the task's data hash, the evaluation size), so a rerun
reuses finished work, a killed run resumes, and a changed expert invalidates exactly what used it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moerge.data.formats import MIXED, MOERGE, FormatField, PromptFormat, scoring_format
from moerge.data.task import Task
from moerge.errors import MoergeError
from moerge.paths import write_json_atomic
from moerge.progress import output_console, styled
from moerge.recipes.library import TaskEntry
from moerge.recipes.strategies import Loaded, StrategySpec, Workspace, load_strategy
from moerge.yamlconf import load_config

console = output_console(stderr=True)
CACHE_VERSION = 2


class Forgetting(BaseModel):
    """General ability of the base: LM loss on a text probe and accuracy on a general task."""

    model_config = ConfigDict(extra="forbid")
    probe: str | None = Field(None, description="task spec whose input+target texts are the LM-loss probe")
    task: str | None = Field(None, description="task spec scored before/after for accuracy")
    limit: int = Field(64, ge=1)


class CompareConfig(BaseModel):
    """A comparison: the experts to train (held-in), the unseen tasks (held-out), the strategies."""

    model_config = ConfigDict(extra="forbid")
    base: str
    library: str = "library"
    method: str = "lora"
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    prompt_format: FormatField | None = Field(
        None, description="prompt format of every task without its own `prompt` (default: moerge)"
    )
    override_prompt_format: FormatField | None = Field(
        None, description="score every strategy in this format, whatever its experts were trained with"
    )
    held_in: list[TaskEntry] = Field(min_length=1)
    held_out: list[TaskEntry] = Field(default_factory=list)
    forgetting: Forgetting = Field(default_factory=Forgetting)
    eval_limit: int | None = Field(100, ge=1)
    explain_limit: int = Field(16, ge=1, description="examples per task for the routing heatmap/accuracy")
    strategies: list[StrategySpec] = Field(min_length=1)

    @field_validator("held_in", "held_out", mode="before")
    @classmethod
    def _task_shorthand(cls, tasks: Any) -> Any:
        return [{"task": t} if isinstance(t, str) else t for t in tasks] if isinstance(tasks, list) else tasks

    @model_validator(mode="after")
    def _disjoint(self) -> CompareConfig:
        held_in = {t.task for t in self.held_in}
        leaked = [t.task for t in self.held_out if t.task in held_in]
        if leaked:
            raise ValueError(f"held-out task {leaked[0]!r} is also held-in; held-out tasks must be unseen")
        names = [s.name for s in self.strategies]
        if len(set(names)) != len(names):
            raise ValueError("strategy names must be unique")
        return self


def load_compare_config(path: Path) -> CompareConfig:
    """Read a compare recipe; errors name file, line and field; `library` is relative to the file."""
    path = Path(path)
    config = load_config(path, CompareConfig, "compare recipe")
    if "://" not in config.library and not Path(config.library).is_absolute():
        config = config.model_copy(update={"library": str((path.parent / config.library).resolve())})
    return config


# ---- the workspace: experts trained or reused, tasks loaded ---------------------------------------------


@dataclass
class Comparison:
    """A prepared comparison: the strategies' shared workspace plus the tasks they are scored on."""

    config: CompareConfig
    workspace: Workspace
    base_fingerprint: str
    held_in: dict[str, Task]
    held_out: dict[str, Task]
    formats: dict[str, PromptFormat | None]  # each task's own format (`prompt`, else the recipe's)

    def scoring(self, loaded: Loaded, task: str | None) -> tuple[PromptFormat, str | None]:
        """The format a strategy is scored in on `task` (None: the forgetting probe), with a note when
        it is not the one its experts were trained with."""
        task_format = self.formats.get(task) if task else self.config.prompt_format
        return scoring_format(loaded.prompt_format, task_format, self.config.override_prompt_format)

    def cache_path(self, spec: StrategySpec, what: str, depends: dict[str, Any]) -> Path:
        fields = {"v": CACHE_VERSION, "strategy": spec.key_dict(), "base": self.base_fingerprint, "what": what}
        key = json.dumps({**fields, **depends}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        return Path(str(self.workspace.out)) / "cache" / f"{spec.name}.{what.replace('/', '_')}.{digest}.json"

    def experts_key(self, spec: StrategySpec, task: str | None = None) -> dict[str, str]:
        """The expert content a strategy's result depends on: the held-in experts it uses, and a
        folder of its own (an expert or router `path`)."""
        used = spec.registered.experts_used
        hashes = self.workspace.expert_hashes
        if used == "none":
            return spec.content_key()
        if used == "own" and task is not None:
            return {task: hashes.get(task, ""), **spec.content_key()}
        return {**hashes, **spec.content_key()}

    def format_depends(self, *tasks: str | None) -> dict[str, Any]:
        """The tasks' own prompt formats, for cache keys: empty when all are moerge's, so the scores
        cached before formats existed stay valid."""
        given = {str(t): format_key(self.formats.get(t) if t else self.config.prompt_format) for t in tasks}
        given = {t: f for t, f in given.items() if f is not None and f != format_key(MOERGE)}
        override = self.config.override_prompt_format
        return {
            **({"prompt_formats": given} if given else {}),
            **({"override_prompt_format": format_key(override)} if override else {}),
        }


def prepare(config: CompareConfig, out: Path, *, retrain: bool = False, progress: bool = True) -> Comparison:
    """Fetch the base, train (or reuse) the held-in experts, load every task with its training split."""
    from moerge.data.loaders import load_task
    from moerge.library import ExpertLibrary
    from moerge.models import fingerprint, resolve_base
    from moerge.recipes.library import LibraryConfig, entry_config, train_library

    base = resolve_base(config.base)
    library_recipe = LibraryConfig(
        base=base,
        library=config.library,
        method=config.method,
        hyperparameters=config.hyperparameters,
        prompt_format=config.prompt_format,
        tasks=config.held_in,
    )
    console.print(styled(("experts", "bold"), f": {len(config.held_in)} held-in tasks → library {config.library}"))
    train_library(library_recipe, retrain=retrain, progress=progress)
    library = ExpertLibrary(config.library)
    held_in, experts, hashes = {}, {}, {}
    for entry in config.held_in:
        cfg = entry_config(library_recipe, entry)
        name = entry.expert_name
        held_in[name] = load_task(entry.task, seed=cfg.seed, limit=cfg.limit)
        experts[name] = Path(library.path(name))
        hashes[name] = expert_content_hash(library.meta(name))
    held_out = {entry.expert_name: load_task(entry.task) for entry in config.held_out}
    refuse_leaked_data(held_in, held_out)
    formats = {e.expert_name: e.prompt or config.prompt_format for e in [*config.held_in, *config.held_out]}
    training = {
        "method": config.method,
        "hyperparameters": config.hyperparameters,
        "tasks": [e.task for e in config.held_in],
        "prompt_format": multitask_format(library_recipe),
    }
    workspace = Workspace(base, library, experts, hashes, training, out)
    return Comparison(config, workspace, fingerprint(base), held_in, held_out, formats)


def expert_content_hash(meta: Any) -> str:
    """What a score of the expert depends on: its files, and its prompt format unless moerge's (so the
    scores cached before formats were recorded stay valid)."""
    from moerge.library.expert import recorded_format

    fmt = recorded_format(meta)
    blob = [meta.files] if fmt == MOERGE else [meta.files, format_key(fmt)]
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def format_key(fmt: Any) -> Any:
    return fmt.model_dump(mode="json") if isinstance(fmt, PromptFormat) else fmt


def multitask_format(recipe: Any) -> PromptFormat | str | None:
    """The one format a multitask adapter over the held-in tasks is trained in; `mixed` when the
    tasks' formats differ (the multitask strategy then refuses to train)."""
    from moerge.recipes.library import entry_config

    formats = [entry_config(recipe, e).prompt_format for e in recipe.tasks]
    return formats[0] if len({json.dumps(format_key(f)) for f in formats}) == 1 else MIXED


def refuse_leaked_data(held_in: dict[str, Task], held_out: dict[str, Task]) -> None:
    """A held-out task whose examples are a held-in task's (the same file by another path, a copy) is
    not unseen: compare the data, not the specs."""
    seen = {task.data_hash(): name for name, task in held_in.items()}
    for name, task in held_out.items():
        if task.data_hash() in seen:
            raise MoergeError(
                f"held_out: task {name!r} has the same examples as held-in task {seen[task.data_hash()]!r};"
                " held-out tasks must be unseen"
            )


# ---- scoring ---------------------------------------------------------------------------------------------


class LazyModel:
    """Loads a strategy's model only when a cache miss needs it, and only once."""

    def __init__(self, comparison: Comparison, spec: StrategySpec, task: str | None = None):
        self.comparison, self.spec, self.task = comparison, spec, task
        self.loaded: Loaded | None = None

    def get(self) -> Loaded:
        if self.loaded is None:
            self.loaded = load_strategy(self.spec, self.comparison.workspace, self.task)
        return self.loaded


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


def _score_task(comparison: Comparison, lazy: LazyModel, task: Task, name: str, limit: int | None) -> dict[str, Any]:
    from moerge.eval.evaluate import evaluate_task
    from moerge.route import routing_context

    loaded = lazy.get()
    fmt, note = comparison.scoring(loaded, name)
    with peak_rss_window() as memory:
        started = time.perf_counter()
        result = evaluate_task(
            loaded.model,
            loaded.tokenizer,
            task,
            fmt=fmt,
            split="test",
            limit=limit,
            batch_context=lambda n: routing_context(task_ids=[name] * n),
            keep_predictions=True,
        )
        seconds = time.perf_counter() - started
    return {**result, "format_note": note, "seconds": seconds, **memory, **loaded.params}


def _score_forgetting(comparison: Comparison, lazy: LazyModel, spec: Forgetting) -> dict[str, Any]:
    from moerge.data.loaders import load_task
    from moerge.eval.evaluate import evaluate_task
    from moerge.eval.forgetting import probe_texts, text_loss

    loaded = lazy.get()
    out: dict[str, Any] = {}
    if spec.probe:
        texts = probe_texts(load_task(spec.probe).test[: spec.limit])
        out["probe_loss"] = text_loss(loaded.model, loaded.tokenizer, texts)
    if spec.task:
        fmt, _ = comparison.scoring(loaded, None)
        general = load_task(spec.task)
        out["task_scores"] = evaluate_task(loaded.model, loaded.tokenizer, general, fmt=fmt, limit=spec.limit)["scores"]
    return out


def _explain(lazy: LazyModel, comparison: Comparison) -> dict[str, Any]:
    from moerge.route.explain import explain_routing, routing_accuracy

    loaded = lazy.get()
    limit = comparison.config.explain_limit
    tasks = {name: task.test[:limit] for name, task in comparison.held_in.items()}
    if getattr(lazy.spec.options, "routes_unseen_tasks", True):
        tasks.update({name: task.test[:limit] for name, task in comparison.held_out.items()})
    formats = {name: comparison.scoring(loaded, name)[0] for name in tasks}
    report = explain_routing(loaded.model, loaded.tokenizer, tasks, formats)
    return {"report": report, "accuracy": routing_accuracy(report, {n: n for n in comparison.held_in})}


def evaluate_strategy(comparison: Comparison, spec: StrategySpec) -> dict[str, Any]:
    """Scores of one strategy on every task, its forgetting and its routing; cached piece by piece."""
    kind = spec.registered
    limit = comparison.config.eval_limit
    tasks: dict[str, Any] = {}
    forgetting: list[dict[str, Any]] = []
    shared = LazyModel(comparison, spec)
    for group, members in (("held_in", comparison.held_in), ("held_out", comparison.held_out)):
        for name, task in members.items():
            if kind.per_task and name not in comparison.workspace.experts:
                continue
            lazy = LazyModel(comparison, spec, name) if kind.per_task else shared
            depends = {
                "experts": comparison.experts_key(spec, name),
                "data": task.data_hash(),
                "limit": limit,
                **comparison.format_depends(name),
            }
            path = comparison.cache_path(spec, f"task/{name}", depends)
            tasks[name] = {"group": group, **_cached(path, partial(_score_task, comparison, lazy, task, name, limit))}
            if kind.per_task:
                forgetting.append(_forgetting_cached(comparison, spec, lazy, name))
    if not kind.per_task:
        forgetting.append(_forgetting_cached(comparison, spec, shared, None))
    routing = None
    if kind.routed:
        depends = {
            "experts": comparison.experts_key(spec),
            "limit": comparison.config.explain_limit,
            "data": sorted(t.data_hash() for t in [*comparison.held_in.values(), *comparison.held_out.values()]),
            **comparison.format_depends(*comparison.formats),
        }
        routing = _cached(comparison.cache_path(spec, "routing", depends), lambda: _explain(shared, comparison))
    return {"strategy": spec.key_dict(), "tasks": tasks, "forgetting": forgetting, "routing": routing}


def _forgetting_cached(comparison: Comparison, spec: StrategySpec, lazy: LazyModel, task: str | None) -> dict:
    forgetting = comparison.config.forgetting
    if not (forgetting.probe or forgetting.task):
        return {}
    depends = {
        "experts": comparison.experts_key(spec, task),
        "forgetting": forgetting.model_dump(),
        **comparison.format_depends(None),
    }
    path = comparison.cache_path(spec, f"forgetting/{task or 'all'}", depends)
    return _cached(path, lambda: _score_forgetting(comparison, lazy, forgetting))


def expert_cost(meta: Any) -> dict[str, Any]:
    """What an expert cost to train, from its moerge.json."""
    keys = ("train_time_s", "trainable_params", "peak_memory_mb", "tokens_per_s")
    return {"method": meta.method, "steps": meta.hyperparameters.get("steps"), **{k: meta.cost.get(k) for k in keys}}


OUT_ENTRIES = {"cache", "routers", "plots", "predictions", "results.json", "results.csv", "report.md", "report.html"}
"""What a compare writes into `--out` (plus hidden temp files, and the library when it lives there)."""


COMPARE_MARKER = ".moerge-compare"
"""Written into `--out` when a compare claims it, so a rerun knows the folder is a compare's."""


def claim_out(out: Path, library: str) -> bool:
    """`--out` is a new or empty folder, or a compare's own (a rerun resumes it); anything else is
    refused before any work, so a compare never writes into a folder of yours — not even one that only
    holds files named like a compare's (your own report.md). Marks the folder as a compare's and
    returns whether this call created it."""
    if out.exists() and not out.is_dir():
        raise MoergeError(f"{out}: --out exists and is not a folder; choose a new or empty folder")
    created = not out.is_dir()
    if not created:
        _check_compare_folder(out, library)
    out.mkdir(parents=True, exist_ok=True)
    (out / COMPARE_MARKER).touch()
    return created


def _check_compare_folder(out: Path, library: str) -> None:
    own = OUT_ENTRIES | {Path(library).name} if Path(library).parent.resolve() == out.resolve() else OUT_ENTRIES
    entries = [p.name for p in out.iterdir() if not p.name.startswith(".")]
    foreign = sorted(name for name in entries if name not in own)
    if foreign:
        raise MoergeError(
            f"{out}: --out holds {foreign[0]!r}, which a compare does not write; choose a new or empty folder "
            "(a compare's own folder is resumed)"
        )
    # `cache/` marks the outputs of compares from before the marker existed
    ours = (out / COMPARE_MARKER).is_file() or (out / "cache").is_dir()
    written = sorted(name for name in entries if name in OUT_ENTRIES)
    if written and not ours:
        raise MoergeError(
            f"{out}: --out holds {written[0]!r} but is not a compare's folder (no {COMPARE_MARKER}); "
            "choose a new or empty folder"
        )


def _remove_if_unused(out: Path) -> None:
    """A compare that failed before writing anything leaves no empty --out behind."""
    if {p.name for p in out.iterdir()} <= {COMPARE_MARKER}:
        shutil.rmtree(out, ignore_errors=True)


def best_router(out: Path) -> tuple[str, Path]:
    """The router a compare output found best for unseen inputs — the highest held-out mean (held-in
    when it had no held-out tasks) among its router strategies — and that router's folder: the one the
    compare built (`routers/<name>-<digest>`) or the `path` its recipe named."""
    from moerge.paths import parse_json

    path = Path(out) / "results.json"
    if not path.is_file():
        raise MoergeError(f"{path}: not found (is {out} a `moerge compare --out` folder?)")
    results = parse_json(path.read_bytes(), path)
    rows = [r for r in results.get("rows", []) if r.get("kind") == "router"]
    if not rows:
        raise MoergeError(f"{path}: the comparison has no router strategy")

    def score(row: dict[str, Any]) -> float:
        group = row.get("held_out") or row.get("held_in") or {}
        return group.get("mean") if group.get("mean") is not None else float("-inf")

    best = max(rows, key=score)["strategy"]
    given = next(
        (s.get("path") for s in results.get("recipe", {}).get("strategies", []) if s.get("name") == best), None
    )
    built = sorted((Path(out) / "routers").glob(f"{best}-*"))
    folder = Path(given) if given else built[-1] if built else None
    if folder is None or not (folder / "config.json").is_file():
        raise MoergeError(f"{out}: the best router {best!r} has no folder under routers/ (was the output moved?)")
    return best, folder


def run_compare(config: CompareConfig, out: Path, *, retrain: bool = False, progress: bool = True) -> dict[str, Any]:
    """Prepare experts, evaluate every strategy, write results.json/.csv, report.md and report.html.
    `retrain`: replace library experts of the held-in tasks' names that other settings made."""
    from moerge.recipes.report import summarise_results, write_predictions, write_reports

    created = claim_out(out, config.library)
    try:
        comparison = prepare(config, out, retrain=retrain, progress=progress)
    except BaseException:
        if created:
            _remove_if_unused(out)
        raise
    raw = []
    for i, spec in enumerate(config.strategies, start=1):
        console.print(styled((f"[{i}/{len(config.strategies)}] strategy {spec.name}", "bold"), f" ({spec.kind})"))
        raw.append(evaluate_strategy(comparison, spec))
    results = summarise_results(raw, held_in=list(comparison.held_in), held_out=list(comparison.held_out))
    library = comparison.workspace.library
    results["experts"] = {name: expert_cost(library.meta(name)) for name in comparison.held_in}
    results["recipe"] = config.model_dump(mode="json")
    write_predictions(raw, out)
    write_reports(results, out)
    return results
