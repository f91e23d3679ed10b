"""What the training loops other than `fit` (DPO in `preference`, MeZO in `zeroth`) share with it: the
starting model made trainable, the expert's metadata, and the expert folder written atomically.

`fit`'s own code stays as it is (other work edits it); these helpers follow its steps and reuse its
helpers, so an expert from any loop has the same folder layout, metadata and cost fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moerge.errors import MoergeError
from moerge.library.expert import BaseInfo, ExpertMeta, TaskInfo, write_expert_meta
from moerge.models.loading import check_finite
from moerge.paths import atomic_directory
from moerge.train.checkpoint import TrainState
from moerge.train.config import TrainConfig
from moerge.train.loop import (
    Start,
    _data_settings,
    _memory_settings,
    load_start,
    peak_memory_mb,
    prepare_for_training,
    training_precision,
)
from moerge.train.methods import TrainingMethod, get_method
from moerge.train.methods.base import InitData

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase


@dataclass
class Run:
    """A loaded run: the model (once `make_trainable` ran, the one to train) and how it was set up."""

    cfg: TrainConfig
    start: Start
    model: Any
    tokenizer: PreTrainedTokenizerBase
    method: TrainingMethod
    device: str
    dtype: str
    base_info: BaseInfo
    details: dict[str, Any]


def load_run(cfg: TrainConfig, start: Start, device: str | None, base_info: BaseInfo | None) -> Run:
    """The starting model and tokenizer, with `fit`'s checks (method kind, precision, targets)."""
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
        method.check(model, cfg)
    base_info = base_info or BaseInfo(name_or_path=start.base, fingerprint=fingerprint(model))
    return Run(cfg, start, model, tokenizer, method, device, dtype, base_info, {})


def make_trainable(run: Run, workdir: Path) -> None:
    """Apply the method (a continued adapter stays as it is), trainable weights in fp32, on the device."""
    import torch

    torch.manual_seed(run.cfg.seed)
    if run.start.adapter:
        run.details = {"continued_from": run.start.adapter}
    else:
        run.model = run.method.prepare(run.model, run.cfg, workdir, InitData([], run.tokenizer))
        run.details = run.method.details(run.model, run.cfg)
    run.model = prepare_for_training(run.model, run.cfg)
    if not run.cfg.quantize:
        run.model.to(run.device)


def trainable(model: nn.Module) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def expert_meta(
    run: Run,
    state: TrainState,
    *,
    lr: float,
    task: TaskInfo,
    metrics: dict[str, Any],
    name: str,
    resumed_from: int,
    extra: dict[str, Any],
) -> ExpertMeta:
    """The metadata `fit` writes, for a run of another loop (`extra` adds that loop's settings)."""
    cfg = run.cfg
    tokens = state.tokens
    return ExpertMeta(
        name=cfg.name or name,
        kind=run.method.kind,
        method=cfg.method,
        task=task,
        base=run.base_info,
        hyperparameters={
            **run.method.hyperparameters(cfg),
            **run.details,
            "lr": lr,
            "steps": state.total_steps,
            "batch_size": cfg.batch_size,
            "max_length": cfg.max_length,
            "seed": cfg.seed,
            "warmup_ratio": cfg.warmup_ratio,
            "weight_decay": cfg.weight_decay,
            "limit": cfg.limit,
            **_data_settings(cfg),
            **_memory_settings(cfg, run.dtype),
            "config_hash": cfg.fingerprint(),
            **extra,
        },
        metrics=metrics,
        prompt_format=cfg.format,
        dtype=run.dtype,
        quantize=cfg.quantize,
        cost={
            "train_time_s": round(state.elapsed_s, 2),
            "peak_memory_mb": round(peak_memory_mb(), 1),
            "trainable_params": sum(p.numel() for p in trainable(run.model)),
            "train_tokens": tokens,
            "tokens_per_s": round(tokens / max(state.elapsed_s, 1e-9), 1),
            "device": run.device,
            "final_loss": state.losses[-1] if state.losses else None,
            "resumed_from_step": resumed_from,
        },
    )


def write_expert(run: Run, meta: ExpertMeta, out: Path, workdir: Path, *, overwrite: bool) -> ExpertMeta:
    """Refuse non-finite weights, then write the expert folder atomically (as `fit` does)."""
    named = [(name, p.detach()) for name, p in run.model.named_parameters() if p.requires_grad]
    check_finite(named, out, "training diverged, nothing was written (try a lower --lr)")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        if run.start.adapter:
            run.model.save_pretrained(tmp)
        else:
            run.method.save(run.model, tmp, workdir)
        if run.method.kind == "full":
            run.tokenizer.save_pretrained(tmp)
        return write_expert_meta(tmp, meta)
