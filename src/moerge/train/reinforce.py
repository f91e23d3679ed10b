"""GRPO stages: reinforcement with verifiable rewards (Shao et al., 2024, DeepSeekMath).

Each step takes `batch_size` prompts of the task's training split, samples `group_size` completions
of each (temperature `sampling_temperature`, at most `max_new_tokens`), rewards them (the task's
scorer, e.g. a reasoning-gym generator's `score_answer` or exact match, or the user's
`module:function`), normalises the rewards within each group, and takes one clipped policy-gradient
step, with an optional KL penalty (k3 estimator, weight `beta`) to the stage's starting policy.

One optimisation step per batch of samples (μ = 1 in the paper's terms): the "old" policy of the ratio
is the sampling policy itself, so ρ = 1 at the step and the clip does not bite; it is kept so that the
loss is GRPO's, and ρ's gradient is the policy gradient.
The reference for the KL is the stage's start: its trainable weights are kept (an adapter's are
small; a full method keeps one copy) and swapped in for the reference forward pass.

Our own loop, not trl's GRPOTrainer, for the same reason as DPO (`moerge.train.preference`): moerge's
stages own their loop, data order, checkpoints and expert folder.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moerge.data.prompts import IGNORE_INDEX, Encoded, collate, pad_batch, prompt_ids
from moerge.errors import MoergeError
from moerge.library.expert import BaseInfo, ExpertMeta
from moerge.models.precision import autocast
from moerge.progress import progress_bar
from moerge.train.checkpoint import TrainState, has_checkpoint, load_checkpoint, save_checkpoint, work_folder
from moerge.train.config import TrainConfig
from moerge.train.data import batch_order
from moerge.train.loop import Start, _evaluate, _task_info, lr_factor
from moerge.train.runs import Run, expert_meta, load_run, make_trainable, trainable, write_expert

if TYPE_CHECKING:
    import torch

    from moerge.data.task import Example, Task

Reward = Callable[[str, "Example"], float]


def load_reward(spec: str | None, task: Task) -> tuple[str, Reward]:
    """(name, function): the task's scorer, or `module:function` imported (one-line errors naming it)."""
    if not spec:
        return f"{task.name} scorer", task.scorer
    module_name, _, function = spec.partition(":")
    if not module_name or not function:
        raise MoergeError(f"reward: {spec!r}: expected `module:function`")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure is the user module's
        raise MoergeError(f"reward: cannot import {module_name!r} ({type(exc).__name__}: {exc})") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise MoergeError(f"reward: {spec!r}: module {module_name!r} has no function {function!r}")
    return spec, fn


def call_reward(name: str, fn: Reward, completion: str, example: Example) -> float:
    """The reward as a float; a raising or non-numeric reward function is one error naming it."""
    try:
        value = fn(completion, example)
    except Exception as exc:  # whatever the user function raises
        raise MoergeError(f"reward function {name} failed: {type(exc).__name__}: {exc}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise MoergeError(f"reward function {name} returned {value!r}; expected a number")
    return float(value)


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(r − mean of its group) / (std of its group + 1e-4); rows are groups of `group_size` in order."""
    groups = rewards.view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True)  # unbiased, as trl's GRPO
    return ((groups - mean) / (std + 1e-4)).reshape(-1)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's objective as a loss, and the mean KL: per token −min(ρ·A, clip(ρ, 1±ε)·A) + β·KL, where
    ρ = exp(log π − log π_old) and KL = exp(ref − log π) − (ref − log π) − 1; averaged over each
    completion's tokens, then over completions. Shapes (completions, tokens); `mask` marks real tokens."""
    import torch

    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv)
    kl = torch.zeros_like(logps)
    if ref_logps is not None:
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
        per_token = per_token + beta * kl
    weights = mask.float()
    counts = weights.sum(dim=1).clamp(min=1)
    loss = ((per_token * weights).sum(dim=1) / counts).mean()
    mean_kl = ((kl * weights).sum(dim=1) / counts).mean()
    return loss, mean_kl.detach()


def token_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the labelled (completion) tokens, and their mask."""
    from moerge.models.logits import answer_token_nll

    nll, mask = answer_token_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    return -nll, mask


@contextmanager
def swapped(params: list, values: list) -> Iterator[None]:
    """Run with `params` set to `values` (the stage's start), then put the current ones back."""
    import torch

    current = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values, strict=True):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, current, strict=True):
                p.copy_(v)


def sample_group(run: Run, examples: list[Example]) -> tuple[list[Encoded], list[str]]:
    """`group_size` sampled completions of each prompt (rows grouped by prompt), as training items with
    labels on the completion (up to and including the end token), and their decoded texts."""
    import torch

    cfg, tok = run.cfg, run.tokenizer
    prompts = [prompt_ids(tok, ex, cfg.format)[-cfg.max_length :] for ex in examples for _ in range(cfg.group_size)]
    ids, mask = pad_batch(prompts, tok.pad_token_id)
    run.model.eval()
    with torch.no_grad(), autocast(run.device, run.dtype):
        out = run.model.generate(
            input_ids=ids.to(run.device),
            attention_mask=mask.to(run.device),
            max_new_tokens=cfg.max_new_tokens,
            do_sample=True,
            temperature=cfg.sampling_temperature,
            top_k=0,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    run.model.train()
    items, texts = [], []
    for prompt, row in zip(prompts, out[:, ids.shape[1] :].tolist(), strict=True):
        completion = row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row
        completion = completion or [tok.eos_token_id]
        items.append(Encoded(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion))
        texts.append(tok.decode(completion, skip_special_tokens=True))
    return items, texts


def fit_grpo(
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
    """`fit` for a grpo stage: same arguments and result; prompts and scorer from `tasks[0]`."""
    import torch

    task = tasks[0]
    if not task.train:
        raise MoergeError(f"{task.source}: the task has no training examples")
    reward_name, reward_fn = load_reward(cfg.reward, task)
    run = load_run(cfg, start, device, base_info)
    with work_folder(out) as workdir:
        make_trainable(run, workdir)
        params = trainable(run.model)
        # The KL's reference: the start's weights, as `prepare` made them (before a checkpoint's are loaded).
        reference = [p.detach().clone() for p in params] if cfg.beta > 0 else []
        lr = cfg.lr or run.method.default_lr
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        total = cfg.steps or max(1, -(-int(cfg.epochs * len(task.train)) // cfg.batch_size))
        state = TrainState(total_steps=total, config_hash=cfg.fingerprint())
        resumed_from = 0
        if resume and has_checkpoint(workdir):
            state = load_checkpoint(workdir, run.model, optimizer, cfg.fingerprint())
            resumed_from = state.step
        _grpo_steps(run, optimizer, task, (reward_name, reward_fn), reference, state, workdir, lr, progress)
        run.model.eval()
        scored = eval_tasks if eval_tasks is not None else tasks
        with autocast(run.device, run.dtype):
            metrics = _evaluate(run.model, run.tokenizer, scored, cfg, progress)
        logs = state.task_losses
        metrics["grpo"] = {key: {"first": values[0], "last": values[-1]} for key, values in logs.items() if values}
        settings = {
            "type": "grpo",
            "reward": reward_name,
            "group_size": cfg.group_size,
            "max_new_tokens": cfg.max_new_tokens,
            "sampling_temperature": cfg.sampling_temperature,
            "clip": cfg.clip,
            "beta": cfg.beta,
            "log": logs,
        }
        meta = expert_meta(
            run,
            state,
            lr=lr,
            task=_task_info(cfg, tasks),
            metrics=metrics,
            name=task.name,
            resumed_from=resumed_from,
            extra={**settings, **(extra or {})},
        )
        return write_expert(run, meta, out, workdir, overwrite=overwrite)


def _grpo_steps(run: Run, optimizer, task: Task, reward, reference, state: TrainState, workdir: Path, lr, progress):
    """Sample, reward, one clipped policy-gradient step; per step logs (in `state.task_losses`, so a
    resumed run keeps them): mean reward, reward std, KL, completion length."""
    import torch

    cfg = run.cfg
    warmup = int(cfg.warmup_ratio * state.total_steps)
    params = trainable(run.model)
    with progress_bar(enabled=progress and sys.stderr.isatty()) as bar:
        job = bar.add_task("grpo", total=state.total_steps, completed=state.step, info="")
        while state.step < state.total_steps:
            started = time.perf_counter()
            torch.manual_seed(cfg.seed * 1_000_003 + state.step)  # the samples replay on resume
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(state.step, state.total_steps, warmup)
            examples = [task.train[i] for i in batch_order(len(task.train), cfg.batch_size, cfg.seed, state.step)]
            items, texts = sample_group(run, examples)
            owners = [ex for ex in examples for _ in range(cfg.group_size)]
            rewards = torch.tensor([call_reward(*reward, text, ex) for text, ex in zip(texts, owners, strict=True)])
            advantages = group_advantages(rewards, cfg.group_size).to(run.device)
            batch = {k: v.to(run.device) for k, v in collate(items, run.tokenizer.pad_token_id).items()}
            ref_logps = None
            if reference:
                with torch.no_grad(), swapped(params, reference), autocast(run.device, run.dtype):
                    ref_logps, _ = token_logps(run.model, batch)
            with autocast(run.device, run.dtype):
                logps, mask = token_logps(run.model, batch)
                loss, kl = grpo_loss(
                    logps, logps.detach(), advantages, mask, clip=cfg.clip, beta=cfg.beta, ref_logps=ref_logps
                )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += int(batch["attention_mask"].sum())
            state.losses.append(round(loss.item(), 4))
            lengths = mask.sum(dim=1).float()
            for key, value in (
                ("mean_reward", rewards.mean()),
                ("reward_std", rewards.std()),
                ("kl", kl),
                ("completion_length", lengths.mean()),
            ):
                state.task_losses.setdefault(key, []).append(round(float(value), 4))
            state.elapsed_s += time.perf_counter() - started
            bar.update(job, advance=1, info=f"reward {state.task_losses['mean_reward'][-1]:.3f}")
            if state.step % cfg.checkpoint_every == 0 and state.step < state.total_steps:
                save_checkpoint(workdir, run.model, optimizer, state)
