"""Built-in methods: peft's LoRA family and (IA)3, PiSSA init, and full fine-tuning."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moerge.train.methods.base import TrainingMethod, register

if TYPE_CHECKING:
    from peft import PeftConfig
    from torch import nn

    from moerge.train.config import TrainConfig


class PeftMethod(TrainingMethod):
    """A method peft implements: `make_config` maps our settings to a peft config."""

    def __init__(self, name: str, make_config: Callable[[TrainConfig], PeftConfig], default_lr: float = 5e-4):
        self.name = name
        self.make_config = make_config
        self.default_lr = default_lr

    def prepare(self, model: nn.Module, cfg: TrainConfig, workdir: Path) -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(model, self.make_config(cfg))

    def save(self, model: nn.Module, out: Path, workdir: Path) -> None:
        model.save_pretrained(out)


def _lora(cfg: TrainConfig, **extra: Any) -> PeftConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
        **extra,
    )


class PissaMethod(PeftMethod):
    """PiSSA: LoRA initialised from the top singular vectors of W, with W replaced by its residual.

    Saved as a plain LoRA (rank 2r) against the *original* base via peft's weight conversion, so
    the expert loads on the unmodified base like any other.
    """

    def __init__(self) -> None:
        super().__init__("pissa", lambda cfg: _lora(cfg, init_lora_weights="pissa_niter_16"))

    def prepare(self, model: nn.Module, cfg: TrainConfig, workdir: Path) -> nn.Module:
        import torch

        torch.manual_seed(cfg.seed)  # the randomised SVD must give the same residual on resume
        peft_model = super().prepare(model, cfg, workdir)
        initial = workdir / "pissa_init"
        if not (initial / "adapter_config.json").is_file():
            peft_model.peft_config["default"].init_lora_weights = True
            peft_model.save_pretrained(initial)
            peft_model.peft_config["default"].init_lora_weights = "pissa_niter_16"
        return peft_model

    def save(self, model: nn.Module, out: Path, workdir: Path) -> None:
        model.save_pretrained(out, path_initial_model_for_weight_conversion=str(workdir / "pissa_init"))


def _ia3(cfg: TrainConfig) -> PeftConfig:
    from peft import IA3Config

    attention = [t for t in cfg.target_modules if t in ("k_proj", "v_proj")] or ["k_proj", "v_proj"]
    return IA3Config(target_modules=[*attention, "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM")


class IA3Method(PeftMethod):
    def __init__(self) -> None:
        super().__init__("ia3", _ia3, default_lr=5e-3)

    def hyperparameters(self, cfg: TrainConfig) -> dict:
        return {"target_modules": self.make_config(cfg).target_modules}


class FullMethod(TrainingMethod):
    """Full fine-tuning baseline: every weight trains; the expert is a whole model folder."""

    name = "full"
    kind = "full"
    default_lr = 2e-5

    def prepare(self, model: nn.Module, cfg: TrainConfig, workdir: Path) -> nn.Module:
        model.requires_grad_(True)
        return model

    def save(self, model: nn.Module, out: Path, workdir: Path) -> None:
        model.save_pretrained(out)

    def hyperparameters(self, cfg: TrainConfig) -> dict:
        return {}


register(PeftMethod("lora", _lora))
register(PeftMethod("dora", lambda cfg: _lora(cfg, use_dora=True)))
register(PeftMethod("rslora", lambda cfg: _lora(cfg, use_rslora=True)))
register(PissaMethod())
register(IA3Method())
register(FullMethod())
