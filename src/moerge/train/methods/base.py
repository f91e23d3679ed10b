"""The training-method interface and its registry."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from moerge.errors import MoergeError

if TYPE_CHECKING:
    from torch import nn

    from moerge.train.config import TrainConfig


class TrainingMethod:
    """How to turn a base model into a trainable one, and how to save the trained expert."""

    name: str
    kind: ClassVar[Literal["adapter", "full"]] = "adapter"
    default_lr: float = 5e-4

    def prepare(self, model: nn.Module, cfg: TrainConfig, workdir: Path) -> nn.Module:
        """Return the model to train; `workdir` holds state that must survive a resume."""
        raise NotImplementedError

    def save(self, model: nn.Module, out: Path, workdir: Path) -> None:
        """Write the expert's weights into `out` (peft's files for adapters)."""
        raise NotImplementedError

    def hyperparameters(self, cfg: TrainConfig) -> dict:
        return {"rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout, "target_modules": cfg.target_modules}


METHODS: dict[str, TrainingMethod] = {}


def register(method: TrainingMethod) -> TrainingMethod:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> TrainingMethod:
    if name not in METHODS:
        raise MoergeError(f"unknown training method {name!r}: expected one of {', '.join(sorted(METHODS))}")
    return METHODS[name]
