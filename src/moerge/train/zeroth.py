"""MeZO: zeroth-order SGD with the seed trick (Malladi et al., 2023), training at inference memory.

Each step draws a seed s and, with z(s) ~ N(0, I) over the trainable weights, regenerated from s each
time it is needed (never stored):

    θ += ε·z;  L+ = L(θ);  θ −= 2ε·z;  L− = L(θ);  θ += ε·z;  g = (L+ − L−)/(2ε);  θ −= lr·g·z

Everything runs under torch.no_grad: no gradients, no optimizer state. The model stays in eval mode
(dropout off) so both forwards see the same function. The seed of step t is a function of (seed, t),
so a resumed run (weights from the checkpoint, the step counter) draws the same directions. The
learning rate is constant, as in the paper.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moerge.data.prompts import collate
from moerge.library.expert import BaseInfo, ExpertMeta
from moerge.models.precision import autocast
from moerge.progress import progress_bar
from moerge.train.checkpoint import TrainState, has_checkpoint, load_checkpoint, save_checkpoint, work_folder
from moerge.train.config import TrainConfig
from moerge.train.data import task_data
from moerge.train.loop import Start, _evaluate, _task_info, batch_loss, total_steps_for
from moerge.train.runs import expert_meta, load_run, make_trainable, trainable, write_expert

if TYPE_CHECKING:
    import torch

    from moerge.data.task import Task


def step_seed(seed: int, step: int) -> int:
    """The direction's seed at `step`: a function of the run's seed and the step (replays on resume)."""
    return (seed * 1_000_003 + step) % 2**63


def perturb(params: list[torch.Tensor], seed: int, scale: float) -> None:
    """θ += scale·z(seed), z drawn parameter by parameter in order from one generator seeded `seed`."""
    import torch

    if not params:
        return
    generator = torch.Generator(device=params[0].device).manual_seed(seed)
    for p in params:
        z = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
        p.add_(z, alpha=scale)


def mezo_step(
    params: list[torch.Tensor], loss_fn: Callable[[], float], seed: int, *, eps: float, lr: float
) -> tuple[float, float, float]:
    """One MeZO update of `params` in place. Returns (projected gradient g, L+, L−)."""
    import torch

    with torch.no_grad():
        perturb(params, seed, eps)
        loss_plus = loss_fn()
        perturb(params, seed, -2 * eps)
        loss_minus = loss_fn()
        perturb(params, seed, eps)
        grad = (loss_plus - loss_minus) / (2 * eps)
        perturb(params, seed, -lr * grad)
    return grad, loss_plus, loss_minus


def fit_mezo(
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
    """`fit` for MeZO methods: same arguments and result; forwards only."""
    import torch

    run = load_run(cfg, start, device, base_info)
    data = task_data(tasks, run.tokenizer, cfg)
    eps = float(getattr(cfg.method_options, "eps", 1e-3))
    with work_folder(out) as workdir:
        make_trainable(run, workdir)
        params = trainable(run.model)
        lr = cfg.lr or run.method.default_lr
        optimizer = torch.optim.SGD(params, lr=lr)  # holds no state: only so checkpoints have their usual shape
        state = TrainState(total_steps=total_steps_for(cfg, len(data.items)), config_hash=cfg.fingerprint())
        resumed_from = 0
        if resume and has_checkpoint(workdir):
            state = load_checkpoint(workdir, run.model, optimizer, cfg.fingerprint())
            resumed_from = state.step
        run.model.eval()
        with progress_bar(enabled=progress and sys.stderr.isatty()) as bar:
            job = bar.add_task("mezo", total=state.total_steps, completed=state.step, info="")
            while state.step < state.total_steps:
                started = time.perf_counter()
                rows = data.batch_indices(state.step)
                batch = {
                    k: v.to(run.device)
                    for k, v in collate([data.items[i] for i in rows], run.tokenizer.pad_token_id).items()
                }
                task_of_row = [data.task_of[i] for i in rows]

                def loss_fn(batch=batch, task_of_row=task_of_row) -> float:
                    with autocast(run.device, run.dtype):
                        loss, _ = batch_loss(run.model, batch, task_of_row, per_task=cfg.per_task_loss)
                    return float(loss)

                _, loss_plus, loss_minus = mezo_step(params, loss_fn, step_seed(cfg.seed, state.step), eps=eps, lr=lr)
                state.step += 1
                state.tokens += 2 * int(batch["attention_mask"].sum())
                state.losses.append(round((loss_plus + loss_minus) / 2, 4))
                state.elapsed_s += time.perf_counter() - started
                bar.update(job, advance=1, info=f"loss {state.losses[-1]:.3f}")
                if state.step % cfg.checkpoint_every == 0 and state.step < state.total_steps:
                    save_checkpoint(workdir, run.model, optimizer, state)
        scored = eval_tasks if eval_tasks is not None else tasks
        with autocast(run.device, run.dtype):
            metrics = _evaluate(run.model, run.tokenizer, scored, cfg, progress)
        task = _task_info(cfg, tasks)
        meta = expert_meta(
            run,
            state,
            lr=lr,
            task=task,
            metrics=metrics,
            name=task.name,
            resumed_from=resumed_from,
            extra={"optimizer": "mezo", "eps": eps, **(extra or {})},
        )
        return write_expert(run, meta, out, workdir, overwrite=overwrite)
