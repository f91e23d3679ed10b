"""The training-method interface and its registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from moerge.registry import Registry
from moerge.yamlconf import CommaList

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from moerge.train.config import TrainConfig

Batch = dict[str, "torch.Tensor"]
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class NoOptions(BaseModel):
    """A method that takes no options of its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TargetOptions(NoOptions):
    """Methods that attach to chosen linear layers."""

    target_modules: CommaList = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        min_length=1,
        description="module names to adapt (comma-separated on the CLI)",
    )


class LoraOptions(TargetOptions):
    """The LoRA family: ΔW = (alpha/r)·B·A on each target module."""

    rank: int = Field(8, ge=1, description="adapter rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scaling alpha/r, alpha/√r for rslora)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")


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
    options: type[BaseModel] = NoOptions

    def init_batches(self, cfg: TrainConfig) -> int:
        """How many training batches `prepare` sees (data-driven initialisations want some)."""
        return 0

    def check(self, model: nn.Module, cfg: TrainConfig) -> None:
        """Refuse settings that do not fit `model` (one MoergeError naming the option), before any data
        is prepared or any file written. Default: nothing to check."""

    def prepare(self, model: nn.Module, cfg: TrainConfig, workdir: Path, data: InitData) -> nn.Module:
        """Return the model to train.

        `workdir` holds state that must survive a resume. `data.batches` are the run's first
        `init_batches(cfg)` training batches (input_ids, attention_mask, labels) on the model's
        device, for data-driven initialisations; other methods ignore them. `prepare` must be
        deterministic: a resumed run calls it again and then loads the checkpoint's weights.
        """
        raise NotImplementedError

    def save(self, model: nn.Module, out: Path, workdir: Path) -> None:
        """Write the expert's weights into `out` (peft's files for adapters)."""
        raise NotImplementedError

    def hyperparameters(self, cfg: TrainConfig) -> dict:
        """What the expert's metadata records about the method: its options, by default."""
        return cfg.method_options.model_dump(mode="json")

    def details(self, model: nn.Module, cfg: TrainConfig) -> dict:
        """Choices made while preparing `model` that the metadata should record (e.g. HFT's frozen half)."""
        return {}

    def trained_details(self, model: nn.Module, cfg: TrainConfig) -> dict:
        """Facts measured on the trained `model` that the metadata should record (e.g. a router's load)."""
        return {}


METHODS: Registry[TrainingMethod] = Registry("training method")


def register(method: TrainingMethod) -> TrainingMethod:
    return METHODS.register(method.name, method)


def get_method(name: str) -> TrainingMethod:
    return METHODS.get(name, field="method")
