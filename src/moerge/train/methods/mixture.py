"""Trained mixtures of LoRA experts: `mixlora` and `hydralora` (one expert folder of kind `mixture`).

- `mixlora` (MixLoRA-style): each FFN projection named in `expert_modules` gets `num_experts` LoRA
  experts behind its own top-k router (softmax over K logits of a linear router on that projection's
  input; the top-k weights renormalised); the other targets (attention) get plain LoRA. A
  Switch-style load-balancing loss, K·Σ_i f_i·P_i − 1 per routed layer averaged over layers (f_i: share
  of top-k assignments to expert i; P_i: mean router probability), is added with `aux_loss_weight`.
- `upcycle`: the experts start as copies of existing LoRA experts (`experts`), every module they adapt
  routed; router and experts train further.
- `hydralora`: every target gets one shared A and `num_experts` B heads behind a router (dense softmax,
  or top-k with `top_k`).

With `num_experts: 1` a mixlora run is exactly a LoRA run (same init, same updates); `models.mixture`
explains why. At the end the router load (share of the tokens' assignments per expert, per layer) is
measured on the run's first `load_batches` training batches and recorded in moerge.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, model_validator

from moerge.errors import MoergeError
from moerge.models.mixture import MixtureSpec, balance_loss, inject_mixture, measure_load, save_mixture
from moerge.train.methods.base import InitData, LoraOptions, NoOptions, TrainingMethod, register
from moerge.train.methods.builtin import check_targets
from moerge.yamlconf import CommaList

if TYPE_CHECKING:
    from torch import nn

    from moerge.library.adapter import LoraAdapter
    from moerge.train.config import TrainConfig

FFN = ["gate_proj", "up_proj", "down_proj"]


class MixtureOptions(LoraOptions):
    """Options shared by the mixtures: experts, routing, balance loss, router init, load measurement."""

    num_experts: int = Field(4, ge=1, description="experts (LoRA B heads for hydralora) per routed module")
    aux_loss_weight: float = Field(0.01, ge=0, description="weight of the load-balancing loss")
    router_std: float = Field(0.02, ge=0, description="router init: N(0, std²) weights (0: uniform routing)")
    load_batches: int = Field(4, ge=1, description="training batches the final router load is measured on")


class MixLoraOptions(MixtureOptions):
    top_k: int = Field(2, ge=1, description="experts each token uses")
    expert_modules: CommaList = Field(
        default_factory=lambda: list(FFN), description="targets that get routed experts (the rest: plain LoRA)"
    )

    @model_validator(mode="after")
    def _top_k_fits(self) -> MixLoraOptions:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k: {self.top_k} exceeds num_experts ({self.num_experts})")
        return self


class HydraLoraOptions(MixtureOptions):
    num_experts: int = Field(3, ge=1, description="B heads per module (one shared A)")
    top_k: int | None = Field(None, ge=1, description="heads each token uses (none: dense softmax over all)")
    aux_loss_weight: float = Field(0.0, ge=0, description="weight of the load-balancing loss (top-k routing)")

    @model_validator(mode="after")
    def _top_k_fits(self) -> HydraLoraOptions:
        if self.top_k is not None and self.top_k > self.num_experts:
            raise ValueError(f"top_k: {self.top_k} exceeds num_experts ({self.num_experts})")
        return self


class MixtureMethod(TrainingMethod):
    """Inject mixture layers into the frozen base; save them as a `mixture` expert folder."""

    kind: ClassVar[str] = "mixture"  # type: ignore[assignment]
    default_lr = 5e-4

    def __init__(self, name: str, options: type[MixtureOptions]) -> None:
        self.name, self.options = name, options

    def spec(self, model: nn.Module, cfg: TrainConfig) -> MixtureSpec:
        """The modules to adapt (peft's matching: the full name or its last part) and how."""
        options = cfg.method_options
        routed_kinds = set(options.expert_modules) if self.name == "mixlora" else set(options.target_modules)
        modules: dict[str, Any] = {}
        for name, _ in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if any(name == t or name.endswith(f".{t}") for t in options.target_modules) and "lm_head" not in name:
                modules[name] = "routed" if leaf in routed_kinds or name in routed_kinds else "lora"
        top_k = getattr(options, "top_k", None) or options.num_experts
        return MixtureSpec(
            variant=self.name,
            num_experts=options.num_experts,
            top_k=top_k,
            rank=options.rank,
            alpha=options.alpha,
            dropout=options.dropout,
            modules=modules,
        )

    def check(self, model: nn.Module, cfg: TrainConfig) -> None:
        check_targets(model, cfg.method_options.target_modules, cfg.method_options.rank)

    def init_batches(self, cfg: TrainConfig) -> int:
        return cfg.method_options.load_batches

    def prepare(self, model: nn.Module, cfg: TrainConfig, workdir: Path, data: InitData) -> nn.Module:
        options = cfg.method_options
        spec = self.spec(model, cfg)
        model = inject_mixture(model, spec, seed=cfg.seed, router_std=options.router_std)
        model.moerge_mixture = (spec, data.batches)  # what `save` and `trained_details` need
        weight = options.aux_loss_weight
        if weight > 0:
            model.moerge_extra_loss = lambda: _weighted(balance_loss(model), weight)
        return model

    def trained_details(self, model: nn.Module, cfg: TrainConfig) -> dict:
        spec, batches = model.moerge_mixture
        return {"num_experts": spec.num_experts, "top_k": spec.top_k, "router_load": measure_load(model, batches)}

    def save(self, model: nn.Module, out: Path, workdir: Path) -> None:
        save_mixture(model, model.moerge_mixture[0], out)


class UpcycleOptions(NoOptions):
    experts: CommaList = Field(min_length=1, description="LoRA expert folders whose copies become the experts")
    top_k: int | None = Field(None, ge=1, description="experts each token uses (none: dense softmax over all)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the experts' input")
    aux_loss_weight: float = Field(0.01, ge=0, description="weight of the load-balancing loss (top-k routing)")
    router_std: float = Field(0.0, ge=0, description="router init: N(0, std²) weights (0: uniform routing)")
    load_batches: int = Field(4, ge=1, description="training batches the final router load is measured on")

    @model_validator(mode="after")
    def _top_k_fits(self) -> UpcycleOptions:
        if self.top_k is not None and self.top_k > len(self.experts):
            raise ValueError(f"top_k: {self.top_k} exceeds the number of experts ({len(self.experts)})")
        return self


class UpcycleMethod(MixtureMethod):
    """A mixlora whose K experts start as the given LoRA experts (every module they adapt is routed),
    then router and experts train further. With uniform routing at the start (router_std 0) over copies
    of one LoRA, the model is that LoRA."""

    def __init__(self) -> None:
        super().__init__("upcycle", UpcycleOptions)

    def adapters(self, cfg: TrainConfig) -> list[LoraAdapter]:
        from moerge.library.adapter import LoraAdapter, open_adapter

        out = []
        for folder in cfg.method_options.experts:
            adapter = open_adapter(folder)
            if not isinstance(adapter, LoraAdapter):
                raise MoergeError(f"experts: {folder} is not a LoRA adapter (upcycling copies LoRA factors)")
            adapter.check_values()
            out.append(adapter.require_plain("upcycling"))
        return out

    def spec(self, model: nn.Module, cfg: TrainConfig) -> MixtureSpec:
        adapters = self.adapters(cfg)
        mapping = adapters[0].check_against(model)
        settings = {(a.rank(m), a.scaling(m)) for a in adapters for m in a.modules}
        if len(settings) != 1 or any(set(a.modules) != set(mapping) for a in adapters):
            raise MoergeError("experts: upcycling needs LoRAs of one rank and alpha on the same modules")
        rank, scaling = settings.pop()
        options = cfg.method_options
        return MixtureSpec(
            variant="mixlora",
            num_experts=len(adapters),
            top_k=options.top_k or len(adapters),
            rank=rank,
            alpha=scaling * rank,
            dropout=options.dropout,
            modules=dict.fromkeys(mapping.values(), "routed"),
        )

    def check(self, model: nn.Module, cfg: TrainConfig) -> None:
        self.spec(model, cfg)

    def prepare(self, model: nn.Module, cfg: TrainConfig, workdir: Path, data: InitData) -> nn.Module:
        import torch
        from safetensors.torch import load_file

        from moerge.models.mixture import mixture_layers

        adapters = self.adapters(cfg)
        mapping = adapters[0].check_against(model)
        model = super().prepare(model, cfg, workdir, data)
        layers = mixture_layers(model)
        with torch.no_grad():
            for k, adapter in enumerate(adapters):
                tensors = load_file(str(adapter.weights_path))
                for module, (key_a, key_b) in adapter.factor_keys.items():
                    layer = layers[mapping[module]]
                    layer.lora_A[k].weight.copy_(tensors[key_a])
                    layer.lora_B[k].weight.copy_(tensors[key_b])
        return model


def _weighted(loss: Any, weight: float) -> Any:
    return None if loss is None else weight * loss


register(MixtureMethod("mixlora", MixLoraOptions))
register(MixtureMethod("hydralora", HydraLoraOptions))
register(UpcycleMethod())
