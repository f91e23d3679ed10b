"""Training flows: `train_expert` trains one expert from a config, or from a multi-stage recipe whose
stages run in order, each starting from the previous stage's result.

A stage `continue`s the previous adapter (keeps training it) or `merge`s it into the weights first
and then applies its own method. A full-weight stage's result simply becomes the next base.

Stage types: `finetune` (default), `pretrain` (LM loss on raw text), `dpo` (preference pairs against the
stage's starting model, `moerge.train.preference`), `grpo` (sampled answers rewarded by a verifiable
scorer, `moerge.train.reinforce`), and `self_train`, which expands
into four units: teacher (fine-tune on the labelled task), pseudo-label the pool, student (train on
the confident pseudo labels, starting where the teacher started), fine-tune the student again on the
labelled task.

Every unit writes its result under `.<out>.work/stages/<key>/` atomically; a finished unit is not
redone, an interrupted one resumes from its checkpoint. The expert is an adapter when the whole
chain is one adapter on the original base, else a full model folder. Its `moerge.json` lists every
unit under `stages` (metrics, cost, hyper-parameters).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from moerge.data.formats import Recorded, combined
from moerge.data.loaders import load_task
from moerge.errors import MoergeError
from moerge.library.expert import (
    METADATA_FILE,
    BaseInfo,
    ExpertMeta,
    payload_files,
    read_expert_meta,
    write_expert_meta,
)
from moerge.paths import EXPERT, atomic_directory, check_replaceable, write_json_atomic
from moerge.progress import output_console
from moerge.train.checkpoint import WORK_MARKER, checkpoint_dir_for, has_checkpoint
from moerge.train.config import StagedConfig, TrainConfig
from moerge.train.loop import Start, fit, load_start
from moerge.train.methods import get_method

console = output_console(stderr=True)
PSEUDO_FILE = "pseudo.jsonl"
PSEUDO_META = "pseudo.json"
Role = Literal["train", "pseudo_label", "pseudo_train"]


@dataclass(frozen=True)
class Unit:
    """One step of a recipe: train (from `parent`'s result, or the base) or pseudo-label a pool."""

    key: str
    stage: str
    type: str  # the stage's type; self_train units say which part: self_train:teacher, ...
    cfg: TrainConfig
    role: Role
    parent: str | None
    start: Literal["continue", "merge"]
    chain_hash: str
    pseudo_from: str | None = None  # pseudo_train: the pseudo_label unit whose labels it trains on


def plan(recipe: StagedConfig) -> list[Unit]:
    """The recipe's units in order, each with a hash of everything up to it (to detect edited recipes)."""
    units: list[Unit] = []
    hashes: dict[str | None, str] = {None: hashlib.sha256(recipe.base.encode()).hexdigest()[:16]}

    def add(key: str, part: str, cfg: TrainConfig, role: Role, parent: str | None, start: Any, **kw: Any) -> str:
        inputs = [hashes[parent], hashes.get(kw.get("pseudo_from")), role, start, cfg.fingerprint()]
        chain = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]
        hashes[key] = chain
        kind = f"self_train:{part}" if part else cfg.type
        units.append(Unit(key, str(cfg.name), kind, cfg, role, parent, start, chain, **kw))
        return key

    previous: str | None = None
    for index, cfg in enumerate(recipe.stages):
        _check_start(recipe, index)
        key = f"{index + 1:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', cfg.name or 'stage')}"
        if cfg.type != "self_train":
            previous = add(key, "", cfg, "train", previous, cfg.start)
            continue
        labelled = cfg.model_copy(
            update={"type": "finetune", "unlabelled": None, "confidence": 0.0, "keep_top": None, "pseudo_steps": None}
        )
        teacher = add(f"{key}.1-teacher", "teacher", labelled, "train", previous, cfg.start)
        pseudo = add(f"{key}.2-pseudo", "pseudo_label", cfg, "pseudo_label", teacher, "continue")
        # The pseudo labels' own settings enter the student's hash through `pseudo_from`.
        student_cfg = labelled.model_copy(update={"steps": cfg.pseudo_steps})
        student = add(
            f"{key}.3-student", "student", student_cfg, "pseudo_train", previous, cfg.start, pseudo_from=pseudo
        )
        previous = add(f"{key}.4-finetune", "finetune", labelled, "train", student, "continue")
    return units


def _check_start(recipe: StagedConfig, index: int) -> None:
    """A stage that continues an adapter must train that adapter: same (adapter) method."""
    if index == 0:
        return
    cfg, before = recipe.stages[index], recipe.stages[index - 1]
    if cfg.start != "continue" or get_method(before.method).kind != "adapter":
        return
    where = f"stages.{index} ({cfg.name})"
    if get_method(cfg.method).kind != "adapter":
        raise MoergeError(
            f"{where}: method {cfg.method!r} trains full weights, so it cannot continue the previous "
            f"stage's {before.method} adapter; set `start: merge`"
        )
    if cfg.method != before.method:
        raise MoergeError(
            f"{where}: `start: continue` keeps training the previous stage's {before.method} adapter, "
            f"so the method must be {before.method!r} too (or set `start: merge`)"
        )


def claim_output(out: Path, *, resume: bool, restart: bool, overwrite: bool, started: bool) -> None:
    """Refuse to clobber anything but an expert (the shared rule, `check_replaceable`), an expert
    without `overwrite`, or to silently drop an interrupted run (`started`: one left progress)."""
    if resume and restart:
        raise MoergeError("--resume and --restart: give one (--resume continues the run, --restart drops it)")
    check_replaceable(out, overwrite=overwrite, kind=EXPERT)
    workdir = checkpoint_dir_for(out)
    if workdir.is_symlink() or (workdir.exists() and not workdir.is_dir()):
        raise MoergeError(f"{workdir}: in the way of the training work folder (not a folder); move it away")
    if workdir.is_dir() and any(workdir.iterdir()) and not (started or (workdir / WORK_MARKER).is_file()):
        raise MoergeError(f"{workdir}: in the way of the training work folder (moerge did not make it); move it away")
    if started and not resume:
        if not restart:
            raise MoergeError(f"{out}: an interrupted run left a checkpoint; pass --resume to continue or --restart")
        shutil.rmtree(workdir)


def train_expert(
    cfg: TrainConfig | StagedConfig,
    out: Path,
    *,
    resume: bool = False,
    restart: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = None,
) -> ExpertMeta:
    """Train an expert from one config or from stages, and write the expert folder `out` (atomically).

    A single fine-tuning config runs the loop directly; stages (and a lone pretraining or
    self-training config, which expands into several steps) run in order, each from the previous result.
    """
    out = Path(out)
    if isinstance(cfg, TrainConfig) and cfg.type != "finetune":
        cfg = StagedConfig(base=cfg.base, name=cfg.name, stages=[cfg])
    for stage in cfg.stages if isinstance(cfg, StagedConfig) else [cfg]:
        trainer_for(stage)  # unknown methods, and a loop that cannot train the stage, fail before anything loads
    units = plan(cfg) if isinstance(cfg, StagedConfig) else []  # so does a stage chain that cannot work
    claim_output(out, resume=resume, restart=restart, overwrite=overwrite, started=_interrupted(out))
    if isinstance(cfg, StagedConfig):
        return _train_stages(cfg, units, out, overwrite=overwrite, progress=progress, device=device)
    tasks = [load_task(spec, seed=cfg.seed, limit=cfg.limit) for spec in cfg.task_specs]
    start = Start(cfg.base)
    return trainer_for(cfg)(
        cfg, out, start=start, tasks=tasks, resume=resume, overwrite=overwrite, progress=progress, device=device
    )


def trainer_for(cfg: TrainConfig) -> Callable[..., ExpertMeta]:
    """The loop that trains `cfg` (all take `fit`'s arguments): DPO for dpo stages, GRPO for grpo stages,
    zeroth-order SGD for MeZO methods, else `fit`."""
    from moerge.train.methods.mezo import ZerothOrder

    if cfg.type in ("dpo", "grpo") and isinstance(get_method(cfg.method), ZerothOrder):
        raise MoergeError(
            f"method: {cfg.method!r} (zeroth-order) does not train {cfg.type} stages; use a gradient method"
        )
    if cfg.type == "dpo":
        from moerge.train.preference import fit_dpo

        return fit_dpo
    if cfg.type == "grpo":
        from moerge.train.reinforce import fit_grpo

        return fit_grpo
    if isinstance(get_method(cfg.method), ZerothOrder):
        from moerge.train.zeroth import fit_mezo

        return fit_mezo
    return fit


def _interrupted(out: Path) -> bool:
    """Whether an earlier run on `out` left progress behind (a checkpoint, or finished stages)."""
    stages_dir = checkpoint_dir_for(out) / "stages"
    return has_checkpoint(checkpoint_dir_for(out)) or (stages_dir.is_dir() and any(stages_dir.iterdir()))


def child_start(parent: Start, result: Path, kind: str, mode: str) -> Start:
    """Where a unit starts, given its parent's start, result folder and kind."""
    if kind == "full":
        return Start(str(result))
    if mode == "continue":
        return Start(parent.base, parent.merged, str(result))
    return Start(parent.base, (*parent.merged, str(result)))


def _train_stages(
    recipe: StagedConfig, units: list[Unit], out: Path, *, overwrite: bool, progress: bool, device: str | None
) -> ExpertMeta:
    """Run the recipe's units (skipping finished ones) and write the expert folder `out`."""
    from moerge.models import fingerprint

    stages_dir = checkpoint_dir_for(out) / "stages"
    base_info = BaseInfo(name_or_path=recipe.base, fingerprint=fingerprint(recipe.base))
    runner = _Runner(recipe, stages_dir, base_info, progress=progress, device=device)
    for number, unit in enumerate(units, start=1):
        runner.run(unit, f"[{number}/{len(units)}]")
    meta = runner.assemble(units[-1], out, overwrite=overwrite)
    shutil.rmtree(checkpoint_dir_for(out), ignore_errors=True)
    return meta


class _Runner:
    """Runs units in order, remembering each one's start and result."""

    def __init__(
        self, recipe: StagedConfig, stages_dir: Path, base_info: BaseInfo, *, progress: bool, device: str | None
    ):
        self.recipe, self.stages_dir, self.base_info = recipe, stages_dir, base_info
        self.progress, self.device = progress, device
        self.starts: dict[str, Start] = {}
        self.metas: dict[str, ExpertMeta] = {}
        self.records: list[dict[str, Any]] = []
        self._tasks: dict[str, Any] = {}

    def task(self, cfg: TrainConfig, spec: str):
        key = f"{spec}|{cfg.seed}|{cfg.limit}"
        if key not in self._tasks:
            self._tasks[key] = load_task(spec, seed=cfg.seed, limit=cfg.limit)
        return self._tasks[key]

    def start_of(self, unit: Unit) -> Start:
        if unit.parent is None:
            return Start(self.recipe.base)
        parent = self.metas[unit.parent]
        return child_start(self.starts[unit.parent], self.stages_dir / unit.parent, parent.kind, unit.start)

    def run(self, unit: Unit, counter: str) -> None:
        folder = self.stages_dir / unit.key
        self.starts[unit.key] = start = self.start_of(unit)
        if unit.role == "pseudo_label":
            record = self.finished_pseudo(folder, unit)
            if record is None:
                console.print(f"{counter} {unit.key}: pseudo-labelling {unit.cfg.unlabelled}")
                record = self.label(unit, folder)
            else:
                console.print(f"{counter} {unit.key}: done before, kept")
            self.records.append(record)
            return
        meta = self.finished(folder, unit)
        if meta is None:
            origin = f"{unit.start} from {unit.parent}" if unit.parent else "from the base"
            console.print(f"{counter} {unit.key}: {unit.type} with {unit.cfg.method} ({origin})")
            meta = self.train(unit, start, folder)
        else:
            console.print(f"{counter} {unit.key}: done before, kept")
        self.metas[unit.key] = meta
        self.records.append(_record(unit, meta))

    def finished(self, folder: Path, unit: Unit) -> ExpertMeta | None:
        if not (folder / METADATA_FILE).is_file():
            return None
        meta = read_expert_meta(folder)
        if meta.hyperparameters.get("chain_hash") != unit.chain_hash:
            raise MoergeError(f"{folder}: stage {unit.key} used other settings (recipe edited?): use --restart")
        return meta

    def finished_pseudo(self, folder: Path, unit: Unit) -> dict[str, Any] | None:
        if not (folder / PSEUDO_META).is_file():
            return None
        record = json.loads((folder / PSEUDO_META).read_text())
        if record.get("chain_hash") != unit.chain_hash:
            raise MoergeError(f"{folder}: stage {unit.key} used other settings (recipe edited?): use --restart")
        return record

    def train(self, unit: Unit, start: Start, folder: Path) -> ExpertMeta:
        cfg = unit.cfg
        labelled = [self.task(cfg, spec) for spec in cfg.task_specs] if cfg.type != "pretrain" else []
        tasks = labelled
        if unit.role == "pseudo_train":
            from moerge.train.pseudo import read_pseudo

            tasks = [read_pseudo(self.stages_dir / str(unit.pseudo_from) / PSEUDO_FILE, labelled[0])]
        return trainer_for(cfg)(
            cfg,
            folder,
            start=start,
            tasks=tasks,
            eval_tasks=labelled,
            resume=True,
            overwrite=True,
            progress=self.progress,
            device=self.device,
            base_info=self.base_info,
            extra={"chain_hash": unit.chain_hash, "stage": unit.stage, "start": unit.start},
        )

    def label(self, unit: Unit, folder: Path) -> dict[str, Any]:
        """Pseudo-label the pool with the teacher (the parent unit's model) and save the kept examples."""
        import torch

        from moerge.train.pseudo import pseudo_label, read_pool, write_pseudo

        cfg = unit.cfg
        parent = str(unit.parent)
        teacher = child_start(self.starts[parent], self.stages_dir / parent, self.metas[parent].kind, "continue")
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer = load_start(teacher, device)
        labelled = self.task(cfg, str(cfg.task))
        pool = read_pool(str(cfg.unlabelled), seed=cfg.seed)
        kept, stats = pseudo_label(
            model, tokenizer, labelled, pool, confidence=cfg.confidence, keep_top=cfg.keep_top, fmt=cfg.format
        )
        if not kept:
            raise MoergeError(
                f"stage {unit.stage}: no pseudo label reached confidence {cfg.confidence} "
                f"(mean confidence {stats['mean_confidence']}); lower `confidence`"
            )
        record = {"key": unit.key, "stage": unit.stage, "type": unit.type, "chain_hash": unit.chain_hash, **stats}
        with atomic_directory(folder, overwrite=True) as tmp:
            write_pseudo(tmp / PSEUDO_FILE, kept)
            write_json_atomic(tmp / PSEUDO_META, record)
        return record

    def assemble(self, last: Unit, out: Path, *, overwrite: bool) -> ExpertMeta:
        """Write the expert: the last adapter as is when the chain allows it, else the merged full model."""
        meta, start, result = self.metas[last.key], self.starts[last.key], self.stages_dir / last.key
        as_adapter = meta.kind == "adapter" and not start.merged and start.base == self.recipe.base
        with atomic_directory(out, overwrite=overwrite) as tmp:
            if meta.kind == "full" or as_adapter:
                for rel in payload_files(result):
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(result / rel, tmp / rel)
            else:
                model, tokenizer = load_start(Start(start.base, (*start.merged, str(result))), "cpu")
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
            trained = [r for r in self.records if "cost" in r]
            final = ExpertMeta(
                name=self.recipe.name or meta.name,
                kind="adapter" if as_adapter else "full",
                method=meta.method,
                task=meta.task,
                base=self.base_info,
                hyperparameters={**meta.hyperparameters, "config_hash": self.recipe.fingerprint()},
                metrics=meta.metrics,
                prompt_format=_stages_format(self.recipe),
                cost=_total_cost(trained),
                stages=self.records,
            )
            return write_expert_meta(tmp, final)


def _stages_format(recipe: StagedConfig) -> Recorded | None:
    """The prompt format of an expert trained in stages: its task stages' (`mixed` if they differ)."""
    formats: list[Recorded] = [stage.format for stage in recipe.stages if stage.type != "pretrain"]
    return combined(formats) if formats else None


def _record(unit: Unit, meta: ExpertMeta) -> dict[str, Any]:
    """What the expert's `stages` list keeps about one trained unit."""
    return {
        "key": unit.key,
        "stage": unit.stage,
        "type": unit.type,
        "method": meta.method,
        "kind": meta.kind,
        "start": unit.start if unit.parent else "base",
        "task": meta.task.model_dump(),
        "hyperparameters": meta.hyperparameters,
        "metrics": meta.metrics,
        "cost": meta.cost,
    }


def _total_cost(records: list[dict[str, Any]]) -> dict[str, Any]:
    costs = [r["cost"] for r in records]
    time_s = sum(c.get("train_time_s", 0.0) for c in costs)
    tokens = sum(c.get("train_tokens", 0) for c in costs)
    return {
        "train_time_s": round(time_s, 2),
        "peak_memory_mb": max(c.get("peak_memory_mb", 0.0) for c in costs),
        "trainable_params": max(c.get("trainable_params", 0) for c in costs),
        "train_tokens": tokens,
        "tokens_per_s": round(tokens / max(time_s, 1e-9), 1),
        "device": costs[-1].get("device"),
        "final_loss": costs[-1].get("final_loss"),
        "resumed_from_step": max(c.get("resumed_from_step", 0) for c in costs),
        "stages": len(records),
    }
