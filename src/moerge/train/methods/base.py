"""The training-method interface and its registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from moerge.errors import MoergeError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from moerge.train.config import TrainConfig

Batch = dict[str, "torch.Tensor"]


@dataclass
class InitData:
    """What data-driven initialisations may look at: the run's first training batches and the tokenizer."""

    batches: list[Batch] = field(default_factory=list)
    tokenizer: PreTrainedTokenizerBase | None = None


class TrainingMethod:
    """How to turn a base model into a trainable one, and how to save the trained expert."""

    name: str
    kind: ClassVar[Literal["adapter", "full"]] = "adapter"
    default_lr: float = 5e-4

    def prepare(self, model: nn.Module, cfg: TrainConfig, workdir: Path, data: InitData) -> nn.Module:
        """Return the model to train.

        `workdir` holds state that must survive a resume. `data.batches` are the run's first
        `cfg.init_batches` training batches (input_ids, attention_mask, labels) on the model's
        device, for data-driven initialisations; other methods ignore them. `prepare` must be
        deterministic: a resumed run calls it again and then loads the checkpoint's weights.
        """
        raise NotImplementedError

    def save(self, model: nn.Module, out: Path, workdir: Path) -> None:
        """Write the expert's weights into `out` (peft's files for adapters)."""
        raise NotImplementedError

    def hyperparameters(self, cfg: TrainConfig) -> dict:
        return {"rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout, "target_modules": cfg.target_modules}

    def details(self, model: nn.Module, cfg: TrainConfig) -> dict:
        """Choices made while preparing `model` that the metadata should record (e.g. HFT's frozen half)."""
        return {}


METHODS: dict[str, TrainingMethod] = {}


def register(method: TrainingMethod) -> TrainingMethod:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> TrainingMethod:
    if name not in METHODS:
        raise MoergeError(f"unknown training method {name!r}: expected one of {', '.join(sorted(METHODS))}")
    return METHODS[name]
