"""Resumable training state, stored as safetensors + JSON only (nothing is pickled).

A checkpoint is a folder written to a temp name and renamed, so a `kill -9` mid-write leaves the
previous checkpoint intact. A write that fails (a full disk, say) removes the temp folder, keeps the
previous checkpoint and is one MoergeError naming the checkpoint; a temp folder a killed run left
behind is removed by the next checkpoint write.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moerge.errors import MoergeError
from moerge.paths import write_json_atomic

if TYPE_CHECKING:
    import torch
    from torch import nn

STATE = "state.json"
PARAMS = "trainable.safetensors"
OPTIM_TENSORS = "optimizer.safetensors"
OPTIM_META = "optimizer.json"


@dataclass
class TrainState:
    """Progress that must survive an interruption."""

    step: int = 0
    total_steps: int = 0
    config_hash: str = ""
    elapsed_s: float = 0.0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)
    task_losses: dict[str, list[float]] = field(default_factory=dict)  # per task, when several mix
    scaler: dict[str, Any] = field(default_factory=dict)  # fp16's GradScaler state (scale, growth tracker)


WORK_MARKER = ".moerge-work"
"""Marks a work folder as moerge's, so a folder of yours that happens to have its name is never removed."""


def checkpoint_dir_for(out: Path) -> Path:
    """The hidden work folder beside the expert's final location."""
    return out.parent / f".{out.name}.work"


@contextmanager
def work_folder(out: Path) -> Iterator[Path]:
    """The hidden work folder of a run writing `out`: removed when the run succeeds, and when it fails
    with nothing to resume from (no checkpoint yet), so a failed run leaves nothing it made behind; a
    checkpoint is kept for `--resume`."""
    workdir = checkpoint_dir_for(out)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / WORK_MARKER).touch()
    try:
        yield workdir
    except BaseException:
        if not has_checkpoint(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    shutil.rmtree(workdir, ignore_errors=True)


def save_checkpoint(workdir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState) -> None:
    from safetensors import SafetensorError

    final = workdir / "checkpoint"
    tmp = workdir / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a killed run's half-written one
    try:
        _write_checkpoint(tmp, model, optimizer, state)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, SafetensorError)):
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise MoergeError(
                f"{final}: could not write the checkpoint ({reason}); the previous checkpoint is kept"
            ) from None
        raise
    old = workdir / "checkpoint.old"
    if not final.exists() and (old / STATE).is_file():
        os.replace(old, final)  # a run killed between the two renames below: its last checkpoint is `old`
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _write_checkpoint(tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState) -> None:
    from safetensors.torch import save_file

    tmp.mkdir(parents=True)
    trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / PARAMS))
    tensors, meta = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(tmp / OPTIM_TENSORS))
    write_json_atomic(tmp / OPTIM_META, meta)
    write_json_atomic(tmp / STATE, asdict(state))


def load_checkpoint(workdir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config_hash: str) -> TrainState:
    """Restore weights and optimizer; refuse a checkpoint made with other settings, or a damaged one."""
    from moerge.models.loading import read_safetensors

    folder = workdir / "checkpoint"
    if not (folder / STATE).is_file() and (workdir / "checkpoint.old" / STATE).is_file():
        folder = workdir / "checkpoint.old"  # killed between the two renames
    try:
        state = _read_state(folder / STATE)
        params = read_safetensors(folder / PARAMS)
        optim = _unflatten_optimizer(
            read_safetensors(folder / OPTIM_TENSORS), json.loads((folder / OPTIM_META).read_text())
        )
    except (OSError, ValueError, TypeError) as exc:
        raise MoergeError(f"{folder}: checkpoint unreadable ({exc}); rerun without --resume to restart") from None
    if state.config_hash != config_hash:
        raise MoergeError(f"{workdir}: checkpoint was made with different settings; use --restart")
    named = dict(model.named_parameters())
    missing = [n for n in params if n not in named]
    if missing:
        raise MoergeError(f"{folder}: checkpoint has parameter {missing[0]!r} the model lacks")
    for name, value in params.items():
        named[name].data.copy_(value)
    optimizer.load_state_dict(optim)
    return state


def _read_state(path: Path) -> TrainState:
    """state.json with its types and step range checked: a hand-edited or damaged file is one line, not a
    traceback later in the loop."""
    from pydantic import TypeAdapter, ValidationError

    raw = json.loads(path.read_text())
    try:
        state = TypeAdapter(TrainState).validate_python(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        field_name = ".".join(str(part) for part in error["loc"]) or "state"
        raise MoergeError(f"{path}: {field_name}: {error['msg']}; rerun without --resume to restart") from None
    if not 0 <= state.step <= state.total_steps:
        raise MoergeError(f"{path}: step: {state.step} is outside 0..{state.total_steps}; rerun without --resume")
    return state


def has_checkpoint(workdir: Path) -> bool:
    return any((workdir / d / STATE).is_file() for d in ("checkpoint", "checkpoint.old"))


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    import torch

    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, slots in state_dict["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, slot = key.split(".", 1)
        state.setdefault(int(idx), {})[slot] = value
    for idx, slots in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(slots)
    return {"state": state, "param_groups": meta["param_groups"]}
