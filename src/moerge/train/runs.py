"""What the training loops other than `fit` (DPO in `preference`, MeZO in `zeroth`) share with it: the
starting model made trainable, the expert's metadata, and the expert folder written atomically.

The metadata and the folder come from the same functions `fit` uses (`build_meta`, `save_expert`), so
an expert from any loop has the same folder layout, metadata and cost fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moerge.errors import MoergeError
from moerge.library.expert import BaseInfo, ExpertMeta, TaskInfo
from moerge.train.checkpoint import TrainState
from moerge.train.config import TrainConfig
from moerge.train.loop import (
    Start,
    build_meta,
    load_start,
    prepare_for_training,
    save_expert,
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
    """The metadata `fit` writes (`build_meta`), for a run of another loop (`extra` adds its settings)."""
    return build_meta(
        run.cfg,
        name=run.cfg.name or name,
        method=run.method,
        details=run.details,
        task=task,
        base_info=run.base_info,
        state=state,
        lr=lr,
        metrics=metrics,
        prompt_format=run.cfg.format,
        dtype=run.dtype,
        device=run.device,
        trainable_params=sum(p.numel() for p in trainable(run.model)),
        resumed_from=resumed_from,
        extra=extra,
    )


def write_expert(run: Run, meta: ExpertMeta, out: Path, workdir: Path, *, overwrite: bool) -> ExpertMeta:
    """Write the expert folder as `fit` does (`save_expert`)."""
    adapter = bool(run.start.adapter)
    return save_expert(run.model, run.method, run.tokenizer, meta, out, workdir, adapter=adapter, overwrite=overwrite)
