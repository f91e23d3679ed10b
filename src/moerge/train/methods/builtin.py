"""Built-in methods: peft's LoRA family and (IA)3, PiSSA and OLoRA inits, and full fine-tuning."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from moerge.errors import MoergeError
from moerge.library.adapter import ADAPTER_CONFIG
from moerge.train.methods.base import InitData, LoraOptions, TargetOptions, TrainingMethod, register

if TYPE_CHECKING:
    from peft import PeftConfig
    from torch import nn

    from moerge.train.config import TrainConfig


class PeftMethod(TrainingMethod):
    """A method peft implements: `make_config` maps our settings to a peft config."""

    def __init__(
        self,
        name: str,
        make_config: Callable[[TrainConfig], PeftConfig],
        default_lr: float = 5e-4,
        options: type[BaseModel] = LoraOptions,
    ):
        self.name = name
        self.make_config = make_config
        self.default_lr = default_lr
        self.options = options

    def check(self, model: nn.Module, cfg: TrainConfig) -> None:
        """Every target module name matches a module of the base (as peft matches them: the full name or
        its last parts), and a LoRA rank fits every targeted linear layer (r ≤ min(out, in))."""
        config = self.make_config(cfg)
        check_targets(model, config.target_modules, getattr(config, "r", None))

    def prepare(self, model: nn.Module, cfg: TrainConfig, workdir: Path, data: InitData) -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(model, self.make_config(cfg))

    def save(self, model: nn.Module, out: Path, workdir: Path) -> None:
        model.save_pretrained(out)


def check_targets(model: nn.Module, targets: Any, rank: int | None) -> None:
    """Refuse a target module name that matches nothing in `model`, and a `rank` larger than a targeted
    linear layer's smaller dimension (the update B·A could not use it)."""
    from torch import nn

    if not targets or isinstance(targets, str):  # a regex, or peft's "all-linear": peft checks those itself
        return
    names = [name for name, _ in model.named_modules()]
    linear = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    for target in sorted(targets):
        matched = [name for name in names if name == target or name.endswith(f".{target}")]
        if not matched:
            kinds = sorted({name.rsplit(".", 1)[-1] for name in linear if "lm_head" not in name})
            raise MoergeError(
                f"target_modules: {target!r} matches no module of the base model"
                f" (its linear layers: {', '.join(kinds)})"
            )
        if rank is None:
            continue
        for name in matched:
            layer = linear.get(name)
            if layer is not None and rank > min(layer.in_features, layer.out_features):
                raise MoergeError(
                    f"rank: {rank} is larger than layer {name} allows ({layer.out_features}×{layer.in_features}:"
                    f" at most {min(layer.in_features, layer.out_features)})"
                )


def _lora(cfg: TrainConfig, **extra: Any) -> PeftConfig:
    from peft import LoraConfig

    options = cfg.method_options
    return LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules,
        task_type="CAUSAL_LM",
        **extra,
    )


class ResidualInitMethod(PeftMethod):
    """A LoRA init that moves part of W into the adapter (W becomes W - B0·A0): PiSSA, OLoRA, CorDA, LoRA-GA.

    The trained adapter is saved as a plain LoRA of rank 2r against the *original* base via peft's
    weight conversion, so the expert loads on the unmodified base like any other. The init must be
    deterministic (seeded), because a resumed run recomputes the residual base.
    """

    initial = "initial_adapter"

    def prepare(self, model: nn.Module, cfg: TrainConfig, workdir: Path, data: InitData) -> nn.Module:
        import torch

        torch.manual_seed(cfg.seed)  # randomised SVDs must give the same residual on resume
        peft_model = self.build(model, cfg, data)
        initial = workdir / self.initial
        if not (initial / ADAPTER_CONFIG).is_file():
            config = peft_model.peft_config["default"]
            init, config.init_lora_weights = config.init_lora_weights, True
            peft_model.save_pretrained(initial)
            config.init_lora_weights = init
        return peft_model

    def build(self, model: nn.Module, cfg: TrainConfig, data: InitData) -> nn.Module:
        """Wrap `model` with the initialised adapter (data-driven inits override this)."""
        return super().prepare(model, cfg, Path(), data)

    def save(self, model: nn.Module, out: Path, workdir: Path) -> None:
        model.save_pretrained(out, path_initial_model_for_weight_conversion=str(workdir / self.initial))


def _ia3(cfg: TrainConfig) -> PeftConfig:
    from peft import IA3Config

    attention = [t for t in cfg.method_options.target_modules if t in ("k_proj", "v_proj")] or ["k_proj", "v_proj"]
    return IA3Config(target_modules=[*attention, "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM")


class IA3Method(PeftMethod):
    def __init__(self) -> None:
        super().__init__("ia3", _ia3, default_lr=5e-3, options=TargetOptions)

    def hyperparameters(self, cfg: TrainConfig) -> dict:
        return {"target_modules": self.make_config(cfg).target_modules}


class FullMethod(TrainingMethod):
    """Full fine-tuning baseline: every weight trains; the expert is a whole model folder.

    Partial fine-tuning methods subclass it and override `trainable`.
    """

    name = "full"
    kind = "full"
    default_lr = 2e-5

    def prepare(self, model: nn.Module, cfg: TrainConfig, workdir: Path, data: InitData) -> nn.Module:
        frozen = self.frozen(model, cfg)
        for name, param in model.named_parameters():
            param.requires_grad_(name not in frozen)
        return model

    def frozen(self, model: nn.Module, cfg: TrainConfig) -> set[str]:
        """Names of the parameters that stay fixed (none: every weight trains)."""
        return set()

    def save(self, model: nn.Module, out: Path, workdir: Path) -> None:
        model.save_pretrained(out)


register(PeftMethod("lora", _lora))
register(PeftMethod("dora", lambda cfg: _lora(cfg, use_dora=True)))
register(PeftMethod("rslora", lambda cfg: _lora(cfg, use_rslora=True)))
register(ResidualInitMethod("pissa", lambda cfg: _lora(cfg, init_lora_weights="pissa_niter_16")))
register(ResidualInitMethod("olora", lambda cfg: _lora(cfg, init_lora_weights="olora")))
register(IA3Method())
register(FullMethod())
