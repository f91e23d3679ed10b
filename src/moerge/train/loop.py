"""Training one expert: a plain PyTorch loop (no Trainer) so resume and cost accounting are exact.

Data order is a function of (seed, step), so a resumed run sees the same batches it would have.
"""

from __future__ import annotations

import math
import random
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from moerge.data.prompts import IGNORE_INDEX, Encoded, encode_for_training
from moerge.errors import MoergeError
from moerge.library.expert import BaseInfo, ExpertMeta, TaskInfo, write_expert_meta
from moerge.paths import atomic_directory
from moerge.progress import progress_bar
from moerge.train.checkpoint import TrainState, checkpoint_dir_for, has_checkpoint, load_checkpoint, save_checkpoint
from moerge.train.config import TrainConfig
from moerge.train.methods import get_method

if TYPE_CHECKING:
    import torch


def peak_memory_mb() -> float:
    """Peak memory so far: GPU allocator peak when on CUDA, else the process's max RSS."""
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batch_order(n_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of the examples in batch `step`: epochs are seeded permutations laid end to end."""
    start = step * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n_examples)
        perm = list(range(n_examples))
        random.Random(seed * 100_003 + epoch).shuffle(perm)
        out.extend(perm[offset : offset + batch_size - len(out)])
    return out


def collate(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked out of attention and loss."""
    import torch

    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, e in enumerate(items):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        mask[row, : len(e.input_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then linear decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.1, 1.0 - 0.9 * (step - warmup) / max(1, total - warmup))


def total_steps_for(cfg: TrainConfig, n_train: int) -> int:
    return cfg.steps or max(1, math.ceil(cfg.epochs * n_train / cfg.batch_size))


def train_expert(
    cfg: TrainConfig,
    out: Path,
    *,
    resume: bool = False,
    restart: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = None,
) -> ExpertMeta:
    """Train `cfg.method` on `cfg.task` and write the expert folder `out` (atomically)."""
    import torch

    from moerge.data.loaders import load_task
    from moerge.eval.evaluate import evaluate_task
    from moerge.models import fingerprint, load_base

    out = Path(out)
    if out.exists() and not overwrite:
        raise MoergeError(f"{out}: already exists (pass --overwrite to replace it)")
    workdir = checkpoint_dir_for(out)
    if has_checkpoint(workdir) and not resume:
        if not restart:
            raise MoergeError(f"{out}: an interrupted run left a checkpoint; pass --resume to continue or --restart")
        shutil.rmtree(workdir)
    method = get_method(cfg.method)
    task = load_task(cfg.task, seed=cfg.seed, limit=cfg.limit)
    if not task.train:
        raise MoergeError(f"{cfg.task}: the task has no training examples")

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_base(cfg.base, device=device)
    base_fp = fingerprint(model)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = method.prepare(model, cfg, workdir)
    model.to(device)
    encoded = [encode_for_training(tokenizer, ex, cfg.max_length) for ex in task.train]
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr or method.default_lr
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    total = total_steps_for(cfg, len(encoded))
    state = TrainState(total_steps=total, config_hash=cfg.fingerprint())
    resumed_from = 0
    if resume and has_checkpoint(workdir):
        state = load_checkpoint(workdir, model, optimizer, cfg.fingerprint())
        resumed_from = state.step

    _run_steps(
        model,
        optimizer,
        encoded,
        cfg,
        state,
        workdir,
        lr=lr,
        pad_id=tokenizer.pad_token_id,
        device=device,
        progress=progress,
    )
    model.eval()
    metrics = {}
    if cfg.eval_split:
        metrics[cfg.eval_split] = evaluate_task(
            model, tokenizer, task, split=cfg.eval_split, limit=cfg.eval_limit, progress=progress
        )
    meta = ExpertMeta(
        name=cfg.name or task.name,
        kind=method.kind,
        method=cfg.method,
        task=TaskInfo(name=task.name, source=task.source, data_hash=task.data_hash()),
        base=BaseInfo(name_or_path=cfg.base, fingerprint=base_fp),
        hyperparameters={
            **method.hyperparameters(cfg),
            "lr": lr,
            "steps": total,
            "batch_size": cfg.batch_size,
            "max_length": cfg.max_length,
            "seed": cfg.seed,
            "warmup_ratio": cfg.warmup_ratio,
            "weight_decay": cfg.weight_decay,
            "limit": cfg.limit,
            "config_hash": cfg.fingerprint(),
        },
        metrics=metrics,
        cost={
            "train_time_s": round(state.elapsed_s, 2),
            "peak_memory_mb": round(peak_memory_mb(), 1),
            "trainable_params": sum(p.numel() for p in params),
            "train_tokens": state.tokens,
            "tokens_per_s": round(state.tokens / max(state.elapsed_s, 1e-9), 1),
            "device": device,
            "final_loss": state.losses[-1] if state.losses else None,
            "resumed_from_step": resumed_from,
        },
    )
    with atomic_directory(out, overwrite=overwrite) as tmp:
        method.save(model, tmp, workdir)
        meta = write_expert_meta(tmp, meta)
    shutil.rmtree(workdir, ignore_errors=True)
    return meta


def _run_steps(
    model,
    optimizer,
    encoded,
    cfg,
    state: TrainState,
    workdir: Path,
    *,
    lr: float,
    pad_id: int,
    device: str,
    progress: bool,
) -> None:
    import torch

    warmup = int(cfg.warmup_ratio * state.total_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    with progress_bar(enabled=progress and sys.stderr.isatty()) as bar:
        job = bar.add_task("train", total=state.total_steps, completed=state.step, info="")
        while state.step < state.total_steps:
            started = time.perf_counter()
            torch.manual_seed(cfg.seed * 1_000_003 + state.step)  # dropout masks replay on resume
            batch = collate(
                [encoded[i] for i in batch_order(len(encoded), cfg.batch_size, cfg.seed, state.step)], pad_id
            )
            batch = {k: v.to(device) for k, v in batch.items()}
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(state.step, state.total_steps, warmup)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += int(batch["attention_mask"].sum())
            state.losses.append(round(loss.item(), 4))
            state.elapsed_s += time.perf_counter() - started
            bar.update(job, advance=1, info=f"loss {state.losses[-1]:.3f}")
            if state.step % cfg.checkpoint_every == 0 and state.step < state.total_steps:
                save_checkpoint(workdir, model, optimizer, state)
