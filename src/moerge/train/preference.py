"""DPO stages: train on preference pairs (prompt, chosen, rejected) against a frozen reference policy.

The reference is the model at the start of the stage (after an SFT stage: the SFT expert, not the
base). Its log-probabilities of every pair are computed once, before the first step (one no-grad pass
over the data), and kept in the run's work folder, so no second copy of the model is held and a
resumed run scores against the same reference (its model has moved by then).

The loss is our own small function, not trl's `DPOTrainer`: that trainer owns its loop, optimizer and
checkpoints, while moerge's stages need its own loop (data order a function of (seed, step), exact
resume, the expert folder and metadata). The formula is the DPO paper's (sigmoid, with the
conservative label smoothing of cDPO) or IPO's squared margin, on log-probabilities summed over the
answer tokens only.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moerge.data.files import _csv_rows, _existing, _is_missing, _jsonl_rows
from moerge.data.prompts import Encoded, collate, encode_for_training
from moerge.data.task import Example
from moerge.errors import MoergeError
from moerge.library.expert import BaseInfo, ExpertMeta, TaskInfo
from moerge.models.precision import autocast
from moerge.progress import progress_bar
from moerge.train.checkpoint import TrainState, has_checkpoint, load_checkpoint, save_checkpoint, work_folder
from moerge.train.config import TrainConfig
from moerge.train.data import batch_order
from moerge.train.loop import Start, _evaluate, _task_info, lr_factor
from moerge.train.runs import Run, expert_meta, load_run, make_trainable, trainable, write_expert

if TYPE_CHECKING:
    import torch

    from moerge.data.task import Task

FIELDS = ("prompt", "chosen", "rejected")
REFERENCE_FILE = "reference_logps.safetensors"


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str


def read_preferences(spec: str) -> list[Pair]:
    """Preference pairs from a .jsonl or .csv file; a bad row is one error naming file:line and the field."""
    path = _existing(spec)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise MoergeError(f"{spec}: preference pairs must be .jsonl or .csv (prompt, chosen, rejected)")
    rows = _jsonl_rows(spec, path) if suffix == ".jsonl" else _csv_rows(spec, path)
    pairs = []
    for where, fields in rows:
        if not isinstance(fields, dict):
            raise MoergeError(f"{where}: expected an object with fields prompt, chosen, rejected")
        values = []
        for name in FIELDS:
            value = fields.get(name)
            if _is_missing(value):
                raise MoergeError(f"{where}: field {name!r} is missing (expected prompt, chosen, rejected)")
            if not isinstance(value, str):
                raise MoergeError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
            values.append(value)
        pairs.append(Pair(*values))
    if not pairs:
        raise MoergeError(f"{spec}: no preference pairs")
    return pairs


def encode_pairs(pairs: list[Pair], tokenizer, cfg: TrainConfig) -> tuple[list[Encoded], list[Encoded]]:
    """Each pair as two training items in the stage's prompt format: labels only on the answer tokens."""
    chosen = [encode_for_training(tokenizer, Example(p.prompt, p.chosen), cfg.max_length, cfg.format) for p in pairs]
    rejected = [
        encode_for_training(tokenizer, Example(p.prompt, p.rejected), cfg.max_length, cfg.format) for p in pairs
    ]
    return chosen, rejected


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(answer | prompt) per row: the sum of the answer tokens' log-probabilities."""
    from moerge.models.logits import answer_token_nll

    nll, _ = answer_token_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    return -nll.sum(dim=1)


def dpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair DPO loss from summed answer log-probs of the policy and the reference.

    h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l));
    sigmoid: −(1−ε)·log σ(β·h) − ε·log σ(−β·h);  ipo: (h − 1/(2β))².
    """
    import torch.nn.functional as F

    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    if loss == "ipo":
        return (margin - 1 / (2 * beta)) ** 2
    return -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)


def pair_logps(model, chosen: list[Encoded], rejected: list[Encoded], pad_id: int, device: str) -> tuple:
    """(chosen, rejected) summed answer log-probs of a batch of pairs, in one forward pass."""
    batch = {k: v.to(device) for k, v in collate([*chosen, *rejected], pad_id).items()}
    logps = sequence_logps(model, batch)
    return logps[: len(chosen)], logps[len(chosen) :], int(batch["attention_mask"].sum())


def dpo_batch_loss(model, chosen, rejected, ref: torch.Tensor, cfg: TrainConfig, pad_id: int, device: str):
    """Mean DPO loss of a batch of pairs, given their reference log-probs `ref` (n, 2); and its tokens."""
    policy_chosen, policy_rejected, tokens = pair_logps(model, chosen, rejected, pad_id, device)
    ref = ref.to(policy_chosen.device)
    losses = dpo_loss(
        policy_chosen,
        policy_rejected,
        ref[:, 0],
        ref[:, 1],
        beta=cfg.beta,
        loss=cfg.loss,
        label_smoothing=cfg.label_smoothing,
    )
    return losses.mean(), tokens


def reference_logps(run: Run, chosen: list[Encoded], rejected: list[Encoded]) -> torch.Tensor:
    """(n, 2) log-probs of every pair's chosen and rejected answer under the model as it is now."""
    import torch

    was_training = run.model.training
    run.model.eval()
    out = []
    size = run.cfg.batch_size
    with torch.no_grad(), autocast(run.device, run.dtype):
        for i in range(0, len(chosen), size):
            c, r, _ = pair_logps(
                run.model, chosen[i : i + size], rejected[i : i + size], run.tokenizer.pad_token_id, run.device
            )
            out.append(torch.stack([c, r], dim=1).float().cpu())
    run.model.train(was_training)
    return torch.cat(out)


def stored_reference(run: Run, workdir: Path, chosen: list[Encoded], rejected: list[Encoded], key: str):
    """The reference log-probs: from the work folder when a run (with these pairs) stored them, else
    computed now, with the model at the start of the stage, and stored."""
    from safetensors.torch import load_file, save_file

    path = workdir / REFERENCE_FILE
    if path.is_file():
        stored = load_file(str(path))
        if key in stored:
            return stored[key]
    ref = reference_logps(run, chosen, rejected)
    save_file({key: ref}, str(path))
    return ref


def fit_dpo(
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
    """`fit` for a dpo stage: same arguments and result; `tasks` are only scored (the data is `preferences`)."""
    import torch

    pairs = read_preferences(str(cfg.preferences))
    run = load_run(cfg, start, device, base_info)
    chosen, rejected = encode_pairs(pairs, run.tokenizer, cfg)
    data_hash = hashlib.sha256(Path(str(cfg.preferences)).read_bytes()).hexdigest()
    with work_folder(out) as workdir:
        make_trainable(run, workdir)
        ref = stored_reference(run, workdir, chosen, rejected, f"pairs_{data_hash[:16]}")
        params = trainable(run.model)
        lr = cfg.lr or run.method.default_lr
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        total = cfg.steps or max(1, -(-int(cfg.epochs * len(pairs)) // (cfg.batch_size * cfg.grad_accum)))
        state = TrainState(total_steps=total, config_hash=cfg.fingerprint())
        resumed_from = 0
        if resume and has_checkpoint(workdir):
            state = load_checkpoint(workdir, run.model, optimizer, cfg.fingerprint())
            resumed_from = state.step
        _dpo_steps(run, optimizer, chosen, rejected, ref, state, workdir, lr=lr, progress=progress)
        run.model.eval()
        metrics = {"preference": preference_accuracy(run, chosen, rejected, ref)}
        scored = eval_tasks if eval_tasks is not None else tasks
        with autocast(run.device, run.dtype):
            metrics = {**_evaluate(run.model, run.tokenizer, scored, cfg, progress), **metrics}
        task = (
            _task_info(cfg, scored)
            if scored
            else TaskInfo(name=Path(str(cfg.preferences)).stem, source=str(cfg.preferences), data_hash=data_hash)
        )
        settings = {
            "type": "dpo",
            "preferences": cfg.preferences,
            "preferences_hash": data_hash,
            "pairs": len(pairs),
            "beta": cfg.beta,
            "loss": cfg.loss,
            "label_smoothing": cfg.label_smoothing,
        }
        meta = expert_meta(
            run,
            state,
            lr=lr,
            task=task,
            metrics=metrics,
            name=task.name,
            resumed_from=resumed_from,
            extra={**settings, **(extra or {})},
        )
        return write_expert(run, meta, out, workdir, overwrite=overwrite)


def _dpo_steps(
    run: Run, optimizer, chosen, rejected, ref, state: TrainState, workdir: Path, *, lr: float, progress: bool
):
    """AdamW steps on the DPO loss; pairs in the seeded order of (seed, step), as `fit` orders examples."""
    import torch

    cfg = run.cfg
    n = cfg.grad_accum
    warmup = int(cfg.warmup_ratio * state.total_steps)
    params = trainable(run.model)
    run.model.train()
    with progress_bar(enabled=progress and sys.stderr.isatty()) as bar:
        job = bar.add_task("dpo", total=state.total_steps, completed=state.step, info="")
        while state.step < state.total_steps:
            started = time.perf_counter()
            torch.manual_seed(cfg.seed * 1_000_003 + state.step)
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(state.step, state.total_steps, warmup)
            total = 0.0
            for k in range(n):
                rows = batch_order(len(chosen), cfg.batch_size, cfg.seed, state.step * n + k)
                with autocast(run.device, run.dtype):
                    loss, tokens = dpo_batch_loss(
                        run.model,
                        [chosen[i] for i in rows],
                        [rejected[i] for i in rows],
                        ref[rows],
                        cfg,
                        run.tokenizer.pad_token_id,
                        run.device,
                    )
                (loss / n).backward()
                total += loss.item() / n
                state.tokens += tokens
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.losses.append(round(total, 4))
            state.elapsed_s += time.perf_counter() - started
            bar.update(job, advance=1, info=f"loss {state.losses[-1]:.3f}")
            if state.step % cfg.checkpoint_every == 0 and state.step < state.total_steps:
                save_checkpoint(workdir, run.model, optimizer, state)


def preference_accuracy(run: Run, chosen, rejected, ref: torch.Tensor) -> dict[str, Any]:
    """After training: how often the implicit reward β·(log π − log π_ref) ranks chosen above rejected,
    and the mean reward margin, over the training pairs."""
    now = reference_logps(run, chosen, rejected)
    margin = (now[:, 0] - ref[:, 0]) - (now[:, 1] - ref[:, 1])
    return {
        "reward_accuracy": round(float((margin > 0).float().mean()), 4),
        "reward_margin": round(float(run.cfg.beta * margin.mean()), 4),
        "n": len(chosen),
    }
