"""`fit`: training one expert (or one stage) in a plain PyTorch loop (no Trainer), so resume and cost
accounting are exact.

Data order is a function of (seed, step), so a resumed run sees the same batches it would have.

Precision and memory (`TrainConfig.dtype`, `grad_accum`, `gradient_checkpointing`, `quantize`):
- the frozen base is held in the compute dtype (bf16/fp16, or 4/8-bit with `quantize`); the trainable
  parameters, their gradients and the optimizer state stay fp32; the forward runs under torch.autocast;
  fp16 scales the loss with torch.amp.GradScaler (so fp16 trains on CUDA only: on a CPU it is refused,
  bf16 is the low-precision choice there);
- with `grad_accum` N an optimizer step takes N micro-batches of `batch_size`: micro-batch k of step s
  is the sampler's batch s·N + k, so with one task (or concat mixing) the examples of a step are those a
  batch of N·batch_size would hold, in the same order; each micro-batch's summed token loss is divided by
  the labelled tokens of the whole step (per task with `per_task_loss`), so the gradient equals that of
  the big batch. Steps, the schedule, logs and checkpoints count optimizer steps: a checkpoint is only
  ever written between two of them, so a resume never starts mid-accumulation.
"""

from __future__ import annotations

import hashlib
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moerge.data.prompts import collate
from moerge.errors import MoergeError
from moerge.library.expert import BaseInfo, ExpertMeta, TaskInfo, write_expert_meta
from moerge.models.loading import check_finite
from moerge.models.precision import autocast
from moerge.paths import atomic_directory
from moerge.progress import progress_bar
from moerge.train.checkpoint import TrainState, has_checkpoint, load_checkpoint, save_checkpoint, work_folder
from moerge.train.config import TrainConfig
from moerge.train.data import TrainingData, task_data, text_data, text_hash
from moerge.train.methods import get_method
from moerge.train.methods.base import InitData

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from moerge.data.formats import PromptFormat
    from moerge.data.task import Task
    from moerge.train.methods.base import TrainingMethod


@dataclass(frozen=True)
class Start:
    """Where a run begins: a base model, adapters merged into it in order, and an adapter to keep training."""

    base: str
    merged: tuple[str, ...] = ()
    adapter: str | None = None


def load_start(
    start: Start,
    device: str,
    *,
    dtype: str | None = None,
    quantize: str | None = None,
    checkpointing: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build the starting model: the base, each merged adapter folded in, the continued adapter trainable.

    Adapters go through the one adapter reader (`attach_adapter`: safetensors only, hashes, finite
    values, shapes against the model), so a pickled or damaged folder is refused, never loaded.
    A quantised base is prepared for k-bit training (peft's `prepare_model_for_kbit_training`) before
    any adapter is put on it."""
    from moerge.library.loading import attach_adapter
    from moerge.models import load_base

    if quantize and start.merged:
        raise MoergeError(
            f"quantize: {quantize}: a stage that merges earlier adapters into the base needs an unquantised base"
            " (use start: continue)"
        )
    model, tokenizer = load_base(start.base, device=device, dtype=dtype, quantize=quantize)
    if quantize:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    for folder in start.merged:
        model = attach_adapter(model, folder).merge_and_unload()
    if start.adapter:
        model = attach_adapter(model, start.adapter, trainable=True)
    return model, tokenizer


def peak_memory_mb() -> float:
    """Peak memory so far: GPU allocator peak when on CUDA, else the process's max RSS."""
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then linear decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.1, 1.0 - 0.9 * (step - warmup) / max(1, total - warmup))


def total_steps_for(cfg: TrainConfig, n_train: int) -> int:
    """Optimizer steps: `steps`, else enough effective batches (batch_size × grad_accum) for `epochs`."""
    return cfg.steps or max(1, math.ceil(cfg.epochs * n_train / (cfg.batch_size * cfg.grad_accum)))


def training_precision(cfg: TrainConfig, device: str) -> str:
    """The compute dtype a run uses on `device` (bf16, fp16 or fp32); refuses, in one line, what cannot
    run here (fp16 off CUDA, a quantised base without CUDA or bitsandbytes) before anything loads."""
    from moerge.models.precision import check_quantize, resolve_dtype

    dtype = resolve_dtype(cfg.dtype, device)
    if dtype == "fp16" and not device.startswith("cuda"):
        raise MoergeError(
            f"dtype: fp16 training needs a CUDA device (its loss scaling is CUDA's); on {device} use bf16 or fp32"
        )
    check_quantize(cfg.quantize, device)
    return dtype


def prepare_for_training(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Trainable parameters in fp32 (mixed precision keeps the master weights and Adam's moments there),
    and gradient checkpointing when asked for (non-reentrant; with a frozen base the embeddings' output
    must require grad so that the recomputed layers have a graph to differentiate)."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    if cfg.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers ≥ 5's name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not all(p.requires_grad for p in model.parameters()):
            model.enable_input_require_grads()
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
    return model


def fit(
    cfg: TrainConfig,
    out: Path,
    *,
    start: Start,
    tasks: list[Task],
    eval_tasks: list[Task] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = None,
    base_info: BaseInfo | None = None,
    extra: dict[str, Any] | None = None,
) -> ExpertMeta:
    """Train from `start` on `tasks` (or `cfg.text` when pretraining), evaluate, write the folder `out`.

    Continuing an adapter (`start.adapter`) keeps training it as it is, whatever `cfg.method` would
    initialise. `eval_tasks` defaults to the trained tasks; `base_info` to the starting model;
    `extra` is added to the recorded hyper-parameters.
    """
    import torch

    from moerge.models import fingerprint

    method = get_method(cfg.method)
    if start.adapter and method.kind != "adapter":
        raise MoergeError(f"method {cfg.method!r} trains full weights: it cannot continue an adapter; use start: merge")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = training_precision(cfg, device)
    model, tokenizer = load_start(
        start, device, dtype=dtype, quantize=cfg.quantize, checkpointing=cfg.gradient_checkpointing
    )
    if not start.adapter:
        method.check(model, cfg)  # e.g. unknown target modules, a rank above a layer's size: before any file
    base_info = base_info or BaseInfo(name_or_path=start.base, fingerprint=fingerprint(model))
    data = text_data(cfg, tokenizer) if cfg.type == "pretrain" else task_data(tasks, tokenizer, cfg)
    with work_folder(out) as workdir:
        torch.manual_seed(cfg.seed)
        if start.adapter:
            details: dict[str, Any] = {"continued_from": start.adapter}
        else:
            init = InitData(
                [_on(_batch(data, s, tokenizer), device) for s in range(method.init_batches(cfg))], tokenizer
            )
            model = method.prepare(model, cfg, workdir, init)
            details = method.details(model, cfg)
        model = prepare_for_training(model, cfg)
        if not cfg.quantize:  # a quantised base is placed at load time (bitsandbytes models refuse .to)
            model.to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        lr = cfg.lr or method.default_lr
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        state = TrainState(total_steps=total_steps_for(cfg, len(data.items)), config_hash=cfg.fingerprint())
        resumed_from = 0
        if resume and has_checkpoint(workdir):
            state = load_checkpoint(workdir, model, optimizer, cfg.fingerprint())
            resumed_from = state.step

        _run_steps(
            model,
            optimizer,
            data,
            cfg,
            state,
            workdir,
            lr=lr,
            tokenizer=tokenizer,
            device=device,
            dtype=dtype,
            progress=progress,
        )
        if not start.adapter:
            details.update(method.trained_details(model, cfg))
        model.eval()
        with autocast(device, dtype):
            metrics = _evaluate(model, tokenizer, eval_tasks if eval_tasks is not None else tasks, cfg, progress)
        if state.task_losses:
            metrics["train_loss_by_task"] = {name: _final(losses) for name, losses in state.task_losses.items()}
        meta = build_meta(
            cfg,
            name=cfg.name or (tasks[0].name if len(tasks) == 1 else "+".join(data.task_names)),
            method=method,
            details=details,
            task=_task_info(cfg, tasks),
            base_info=base_info,
            state=state,
            lr=lr,
            metrics=metrics,
            prompt_format=None if cfg.type == "pretrain" else cfg.format,
            dtype=dtype,
            device=device,
            trainable_params=sum(p.numel() for p in params),
            resumed_from=resumed_from,
            extra=extra or {},
        )
        meta = save_expert(
            model, method, tokenizer, meta, out, workdir, adapter=bool(start.adapter), overwrite=overwrite
        )
    return meta


def build_meta(
    cfg: TrainConfig,
    *,
    name: str,
    method: TrainingMethod,
    details: dict[str, Any],
    task: TaskInfo,
    base_info: BaseInfo,
    state: TrainState,
    lr: float,
    metrics: dict[str, Any],
    prompt_format: PromptFormat | None,
    dtype: str,
    device: str,
    trainable_params: int,
    resumed_from: int,
    extra: dict[str, Any],
) -> ExpertMeta:
    """The expert's metadata, the same for every training loop (fit, DPO, GRPO, MeZO): the settings it
    was trained with (and their fingerprint), its metrics and its cost."""
    return ExpertMeta(
        name=name,
        kind=method.kind,
        method=cfg.method,
        task=task,
        base=base_info,
        hyperparameters={
            **method.hyperparameters(cfg),
            **details,
            "lr": lr,
            "steps": state.total_steps,
            "batch_size": cfg.batch_size,
            "max_length": cfg.max_length,
            "seed": cfg.seed,
            "warmup_ratio": cfg.warmup_ratio,
            "weight_decay": cfg.weight_decay,
            "limit": cfg.limit,
            **_data_settings(cfg),
            **_memory_settings(cfg, dtype),
            "config_hash": cfg.fingerprint(),
            **extra,
        },
        metrics=metrics,
        prompt_format=prompt_format,
        dtype=dtype,
        quantize=cfg.quantize,
        cost={
            "train_time_s": round(state.elapsed_s, 2),
            "peak_memory_mb": round(peak_memory_mb(), 1),
            "trainable_params": trainable_params,
            "train_tokens": state.tokens,
            "tokens_per_s": round(state.tokens / max(state.elapsed_s, 1e-9), 1),
            "device": device,
            "final_loss": state.losses[-1] if state.losses else None,
            "resumed_from_step": resumed_from,
        },
    )


def save_expert(
    model: nn.Module,
    method: TrainingMethod,
    tokenizer: PreTrainedTokenizerBase,
    meta: ExpertMeta,
    out: Path,
    workdir: Path,
    *,
    adapter: bool,
    overwrite: bool,
) -> ExpertMeta:
    """Refuse non-finite trained weights, then write the expert folder atomically. `adapter`: the run
    continued an adapter, which peft saves as it is."""
    trained = [(name, p.detach()) for name, p in model.named_parameters() if p.requires_grad]
    check_finite(trained, out, "training diverged, nothing was written (try a lower --lr)")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        if adapter:
            model.save_pretrained(tmp)
        else:
            method.save(model, tmp, workdir)
        if method.kind == "full":
            tokenizer.save_pretrained(tmp)  # a full expert is a complete model folder
        return write_expert_meta(tmp, meta)


def _batch(data: TrainingData, step: int, tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    return collate([data.items[i] for i in data.batch_indices(step)], tokenizer.pad_token_id)


def _on(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _final(losses: list[float]) -> float:
    """Mean of the last tenth of a loss curve: less noisy than the last value."""
    tail = losses[-max(1, len(losses) // 10) :]
    return round(sum(tail) / len(tail), 4)


def _data_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The multi-task and stage settings, recorded only where they are used."""
    out: dict[str, Any] = {}
    if cfg.tasks is not None:
        out.update(tasks=cfg.tasks, mixing=cfg.mixing, per_task_loss=cfg.per_task_loss)
        if cfg.mixing == "temperature":
            out["temperature"] = cfg.temperature
        if cfg.mixing == "weights":
            out["weights"] = cfg.weights
    if cfg.type == "pretrain":
        out.update(type="pretrain", text=cfg.text)
    return out


def _memory_settings(cfg: TrainConfig, dtype: str) -> dict[str, Any]:
    """The precision and memory settings: the dtype always, the others where they are not the default."""
    out: dict[str, Any] = {"dtype": dtype}
    if cfg.grad_accum > 1:
        out.update(grad_accum=cfg.grad_accum, effective_batch_size=cfg.batch_size * cfg.grad_accum)
    if cfg.gradient_checkpointing:
        out["gradient_checkpointing"] = True
    if cfg.quantize:
        out["quantize"] = cfg.quantize
    return out


def _task_info(cfg: TrainConfig, tasks: list[Task]) -> TaskInfo:
    if cfg.type == "pretrain":
        files = list(cfg.text or [])
        return TaskInfo(name="text", source=",".join(files), data_hash=text_hash(files))
    if len(tasks) == 1:
        return TaskInfo(name=tasks[0].name, source=tasks[0].source, data_hash=tasks[0].data_hash())
    hashes = [t.data_hash() for t in tasks]
    return TaskInfo(
        name="+".join(t.name for t in tasks),
        source=",".join(t.source for t in tasks),
        data_hash=hashlib.sha256("".join(hashes).encode()).hexdigest(),
        tasks=[{"name": t.name, "source": t.source, "data_hash": h} for t, h in zip(tasks, hashes, strict=True)],
    )


def _evaluate(model, tokenizer, tasks: list[Task], cfg: TrainConfig, progress: bool) -> dict[str, Any]:
    """Scores on `cfg.eval_split`: one task's result as is; several tasks' mean plus each task's result."""
    from moerge.eval.evaluate import evaluate_task

    if not cfg.eval_split or not tasks:
        return {}
    split = cfg.eval_split
    results = {
        t.name: evaluate_task(model, tokenizer, t, fmt=cfg.format, split=split, limit=cfg.eval_limit, progress=progress)
        for t in tasks
    }
    if len(tasks) == 1:
        return {split: next(iter(results.values()))}
    scored = [r["accuracy"] for r in results.values() if r["accuracy"] is not None]
    mean = sum(scored) / len(scored) if scored else None
    summary = {"accuracy": mean, "n": sum(r["n"] for r in results.values()), "mode": "mean over tasks"}
    return {split: summary, "tasks": {name: {split: r} for name, r in results.items()}}


@dataclass(frozen=True)
class LossScale:
    """The denominators of an optimizer step's loss when it is accumulated over micro-batches: the
    labelled tokens of the whole step, overall and per task (so each micro-batch's share sums to the
    loss the whole step would have as one batch)."""

    tokens: int
    task_tokens: dict[int, int]


def loss_scale(batches: list[dict[str, torch.Tensor]], tasks_of_rows: list[list[int]]) -> LossScale:
    """Count the labelled (predicted) tokens of every micro-batch of a step, overall and per task."""
    from moerge.data.prompts import IGNORE_INDEX

    task_tokens: dict[int, int] = {}
    for batch, task_of_row in zip(batches, tasks_of_rows, strict=True):
        per_row = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
        for t, n in zip(task_of_row, per_row, strict=True):
            task_tokens[t] = task_tokens.get(t, 0) + int(n)
    return LossScale(sum(task_tokens.values()), task_tokens)


def batch_loss(
    model,
    batch: dict[str, torch.Tensor],
    task_of_row: list[int],
    *,
    per_task: bool,
    scale: LossScale | None = None,
) -> tuple[torch.Tensor, dict[int, float]]:
    """Next-token loss over the answer tokens, and each task's own mean loss in the batch.

    With `per_task`, the loss is the mean of the tasks' means, so a task with few (or short)
    examples in the batch weighs as much as a large one; otherwise every token weighs the same.
    With `scale` (gradient accumulation) the batch is one micro-batch of a step: the token sums are
    divided by the step's counts instead of the batch's own, so the micro-batches' losses add up to
    the step's loss. The per-task values returned are then the task's summed loss over the step's
    tokens of that task (they too add up over the micro-batches).
    """
    import torch

    from moerge.models.logits import answer_token_nll

    nll, labelled = answer_token_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    counted = labelled.sum(dim=1)
    row_sums = nll.sum(dim=1)
    rows = torch.tensor(task_of_row, device=row_sums.device)
    task_means = {}
    for t in sorted(set(task_of_row)):
        mine = rows == t
        denominator = counted[mine].sum().clamp(min=1) if scale is None else max(1, scale.task_tokens[t])
        task_means[t] = row_sums[mine].sum() / denominator
    if scale is None:
        every_token = row_sums.sum() / counted.sum().clamp(min=1)
        loss = torch.stack(list(task_means.values())).mean() if per_task else every_token
    elif per_task:
        loss = torch.stack(list(task_means.values())).sum() / len(scale.task_tokens)
    else:
        loss = row_sums.sum() / max(1, scale.tokens)
    return loss, {t: float(v.detach()) for t, v in task_means.items()}


def _run_steps(
    model,
    optimizer,
    data: TrainingData,
    cfg: TrainConfig,
    state: TrainState,
    workdir: Path,
    *,
    lr: float,
    tokenizer: PreTrainedTokenizerBase,
    device: str,
    dtype: str = "fp32",
    progress: bool,
) -> None:
    import torch

    warmup = int(cfg.warmup_ratio * state.total_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    several = len(data.task_names) > 1
    scaler = torch.amp.GradScaler("cuda") if dtype == "fp16" else None
    if scaler is not None and state.scaler:
        scaler.load_state_dict(state.scaler)
    model.train()
    with progress_bar(enabled=progress and sys.stderr.isatty()) as bar:
        job = bar.add_task("train", total=state.total_steps, completed=state.step, info="")
        while state.step < state.total_steps:
            started = time.perf_counter()
            torch.manual_seed(cfg.seed * 1_000_003 + state.step)  # dropout masks replay on resume
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(state.step, state.total_steps, warmup)
            loss, by_task, tokens = _accumulate(model, data, cfg, state.step, tokenizer, device, dtype, scaler)
            if scaler is not None:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
                state.scaler = scaler.state_dict()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += tokens
            state.losses.append(round(loss, 4))
            if several:
                for t, value in by_task.items():
                    state.task_losses.setdefault(data.task_names[t], []).append(round(value, 4))
            state.elapsed_s += time.perf_counter() - started
            bar.update(job, advance=1, info=f"loss {state.losses[-1]:.3f}")
            if state.step % cfg.checkpoint_every == 0 and state.step < state.total_steps:
                save_checkpoint(workdir, model, optimizer, state)


def _accumulate(
    model,
    data: TrainingData,
    cfg: TrainConfig,
    step: int,
    tokenizer: PreTrainedTokenizerBase,
    device: str,
    dtype: str,
    scaler: torch.amp.GradScaler | None,
) -> tuple[float, dict[int, float], int]:
    """Forward and backward the step's `grad_accum` micro-batches (the sampler's batches step·N … step·N+N−1),
    leaving the step's gradient in `.grad`. Returns the step's loss, each task's loss and its tokens."""
    n = cfg.grad_accum
    rows = [data.batch_indices(step * n + k) for k in range(n)]
    batches = [collate([data.items[i] for i in r], tokenizer.pad_token_id) for r in rows]
    tasks = [[data.task_of[i] for i in r] for r in rows]
    scale = loss_scale(batches, tasks) if n > 1 else None
    total, by_task, tokens = 0.0, {}, 0
    for batch, task_of_row in zip(batches, tasks, strict=True):
        batch = _on(batch, device)
        with autocast(device, dtype):
            loss, parts = batch_loss(model, batch, task_of_row, per_task=cfg.per_task_loss, scale=scale)
            extra = getattr(model, "moerge_extra_loss", None)  # a method's regulariser (e.g. a mixture's balance)
            extra = extra() if extra is not None else None
            if extra is not None:
                loss = loss + extra / n
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.item()
        tokens += int(batch["attention_mask"].sum())
        for t, value in parts.items():
            by_task[t] = by_task.get(t, 0.0) + value
    return total, by_task, tokens
