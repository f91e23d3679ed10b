"""Partial fine-tuning: full-weight experts where only some parameters train.

- `hft` (Half Fine-Tuning): for each kind of weight matrix (q, k, v, o, gate, up, down, ...), a
  seeded random half of the layers' matrices of that kind is frozen; the rest of the model
  (embeddings, norms) trains as in full fine-tuning. With an odd number of layers, floor(L/2) are
  frozen. The choice is recorded in the expert's metadata; a stage's seed picks it, and recipe stages
  get different seeds by default, so each stage freezes a different half.
- `bitfit`: only biases and norm scales (1-D parameters) train. Llama has no biases, so on Llama
  this trains the RMSNorm weights only.
- `freeze_lower`: full fine-tuning with the input embeddings and the lowest `freeze_layers` decoder
  layers frozen (with tied embeddings the output head is frozen too).
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING

from pydantic import Field

from moerge.errors import MoergeError
from moerge.train.methods.base import NoOptions, register
from moerge.train.methods.builtin import FullMethod

if TYPE_CHECKING:
    from torch import nn

    from moerge.train.config import TrainConfig

_LAYER_MATRIX = re.compile(r"\.(\d+)\.(?:.*\.)?([^.]+)\.weight$")


def layer_matrices(model: nn.Module) -> dict[str, dict[int, str]]:
    """kind (module leaf name) -> layer index -> parameter name, for 2-D weights inside numbered layers."""
    out: dict[str, dict[int, str]] = {}
    for name, param in model.named_parameters():
        match = _LAYER_MATRIX.search(name)
        if match and param.ndim == 2:
            out.setdefault(match.group(2), {})[int(match.group(1))] = name
    return out


def hft_choice(model: nn.Module, seed: int) -> dict[str, list[int]]:
    """kind -> the layers whose matrix of that kind is frozen: a seeded half, drawn per kind."""
    rng = random.Random(f"hft:{seed}")
    choice = {}
    for kind, layers in sorted(layer_matrices(model).items()):
        indices = sorted(layers)
        choice[kind] = sorted(rng.sample(indices, len(indices) // 2))
    return choice


class HalfFineTuning(FullMethod):
    name = "hft"

    def frozen(self, model: nn.Module, cfg: TrainConfig) -> set[str]:
        matrices = layer_matrices(model)
        return {matrices[kind][i] for kind, layers in hft_choice(model, cfg.seed).items() for i in layers}

    def hyperparameters(self, cfg: TrainConfig) -> dict:
        return {"hft_seed": cfg.seed}

    def details(self, model: nn.Module, cfg: TrainConfig) -> dict:
        return {"hft_frozen_layers": hft_choice(model, cfg.seed)}


class BitFit(FullMethod):
    name = "bitfit"
    default_lr = 1e-3

    def frozen(self, model: nn.Module, cfg: TrainConfig) -> set[str]:
        return {name for name, param in model.named_parameters() if param.ndim != 1}


class FreezeLowerOptions(NoOptions):
    freeze_layers: int = Field(0, ge=0, description="number of lowest decoder layers kept frozen")


class FreezeLower(FullMethod):
    name = "freeze_lower"
    options = FreezeLowerOptions

    def frozen(self, model: nn.Module, cfg: TrainConfig) -> set[str]:
        layers = {i for by_layer in layer_matrices(model).values() for i in by_layer}
        if cfg.method_options.freeze_layers > len(layers):
            raise MoergeError(
                f"freeze_layers: {cfg.method_options.freeze_layers} exceeds the model's {len(layers)} layers"
            )
        embedding = model.get_input_embeddings().weight
        out = {name for name, param in model.named_parameters() if param is embedding}
        for name, _ in model.named_parameters():
            match = re.search(r"\.(\d+)\.", name)
            if match and int(match.group(1)) < cfg.method_options.freeze_layers:
                out.add(name)
        return out


register(HalfFineTuning())
register(BitFit())
register(FreezeLower())
