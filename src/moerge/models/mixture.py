"""Mixture-of-LoRA layers (MixLoRA, HydraLoRA): K low-rank experts on a frozen linear layer behind a router.

A mixture expert folder holds `mixture_config.json` (what was adapted and how) and
`mixture_model.safetensors` (the experts' and routers' weights, keyed `<module>.lora_A.<k>.weight`,
`<module>.lora_B.<k>.weight`, `<module>.router`); `load_mixture` puts it on a loaded base.

A routed layer computes base(x) + scaling · Σ_k g_k(x) · B_k A_k x, with g = softmax(R·x) (top-k kept and
renormalised when top_k < K). HydraLoRA shares one A across the K heads B_k. An unrouted layer is plain
LoRA. The parametrisation mirrors peft's LoRA exactly — the same modules created in the same order,
the same initialisation, and with one expert the gate is exactly 1 — so a K=1 mixture trains to the
same weights as peft's LoRA from the same seed. Routers draw their initial weights from their own
seeded generator, so they do not shift the experts' random initialisation.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from moerge.errors import MoergeError
from moerge.paths import parse_json
from moerge.yamlconf import validate

if TYPE_CHECKING:
    from collections.abc import Iterable

MIXTURE_CONFIG = "mixture_config.json"
MIXTURE_WEIGHTS = "mixture_model.safetensors"


class MixtureSpec(BaseModel):
    """What `mixture_config.json` holds: how each adapted module is built."""

    model_config = ConfigDict(extra="forbid")
    format: int = 1
    variant: Literal["mixlora", "hydralora"]
    num_experts: int = Field(ge=1)
    top_k: int = Field(ge=1)
    rank: int = Field(ge=1)
    alpha: float = Field(gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    modules: dict[str, Literal["lora", "routed"]] = Field(min_length=1)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class RoutingContext:
    """State shared by a model's mixture layers: the current batch's attention mask (so padding neither
    counts in the load-balancing loss nor in the load statistics)."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.mask = kwargs.get("attention_mask")


class LoraMixtureLinear(nn.Module):
    """A frozen linear layer plus K LoRA experts (one shared A with `shared_a`) behind a router (none when
    unrouted: plain LoRA)."""

    def __init__(
        self,
        base: nn.Linear,
        *,
        experts: int,
        top_k: int,
        rank: int,
        scaling: float,
        dropout: float,
        shared_a: bool,
        routed: bool,
        context: RoutingContext,
    ) -> None:
        super().__init__()
        self.base_layer = base
        self.num_experts, self.top_k, self.scaling, self.shared_a = experts, top_k, scaling, shared_a
        self.context = context
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.lora_A, self.lora_B = nn.ModuleList(), nn.ModuleList()
        for k in range(experts):  # peft's order: A then B, each an nn.Linear, then A re-initialised
            if k == 0 or not shared_a:
                self.lora_A.append(nn.Linear(base.in_features, rank, bias=False))
            self.lora_B.append(nn.Linear(rank, base.out_features, bias=False))
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        for b in self.lora_B:
            nn.init.zeros_(b.weight)
        self.router = nn.Parameter(torch.zeros(experts, base.in_features)) if routed else None
        self.to(base.weight.device)
        self.aux: torch.Tensor | None = None
        self.counting = False
        self.load_sum = torch.zeros(experts)
        self.tokens = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        h = self.lora_dropout(x.to(self.lora_A[0].weight.dtype))
        if self.router is None:
            return result + (self.lora_B[0](self.lora_A[0](h)) * self.scaling).to(result.dtype)
        gates = self.route(x)
        shared = self.lora_A[0](h) if self.shared_a else None
        delta = 0
        for k, b in enumerate(self.lora_B):
            a = shared if shared is not None else self.lora_A[k](h)
            delta = delta + gates[..., k : k + 1] * b(a)
        return result + (delta * self.scaling).to(result.dtype)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token expert weights (..., K) in fp32: softmax of the router's logits, top-k renormalised."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            probs = F.linear(x.float(), self.router.float()).softmax(dim=-1)
        if self.top_k >= self.num_experts:
            gates, chosen = probs, torch.ones_like(probs, dtype=torch.bool)
        else:
            top, index = probs.topk(self.top_k, dim=-1)
            gates = torch.zeros_like(probs).scatter(-1, index, top / top.sum(dim=-1, keepdim=True))
            chosen = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, index, True)
        self._record(probs, chosen)
        return gates

    def _record(self, probs: torch.Tensor, chosen: torch.Tensor) -> None:
        """The Switch/MixLoRA balance loss K·Σ_i f_i·P_i − 1 over the batch's real tokens (f_i: share of the
        top-k assignments going to expert i; P_i: mean router probability; 0 when balanced, and exactly 0
        with one expert), and the assignment counts when measuring load."""
        mask = self.context.mask
        probs, chosen = probs.reshape(-1, self.num_experts), chosen.reshape(-1, self.num_experts)
        if mask is not None and mask.numel() == probs.shape[0]:
            keep = mask.reshape(-1).to(probs.device).bool()
            probs, chosen = probs[keep], chosen[keep]
        n = max(1, probs.shape[0])
        share = chosen.float().sum(dim=0) / (n * self.top_k)
        self.aux = self.num_experts * (share * (probs.sum(dim=0) / n)).sum() - 1
        if self.counting:
            self.load_sum += chosen.float().sum(dim=0).detach().cpu()
            self.tokens += probs.shape[0]


def mixture_layers(model: nn.Module) -> dict[str, LoraMixtureLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraMixtureLinear)}


def routed_layers(model: nn.Module) -> dict[str, LoraMixtureLinear]:
    return {name: m for name, m in mixture_layers(model).items() if m.router is not None}


def inject_mixture(model: nn.Module, spec: MixtureSpec, *, seed: int = 0, router_std: float = 0.0) -> nn.Module:
    """Replace each module `spec.modules` names by its mixture layer, in the model's module order (peft's,
    so one expert draws peft's LoRA initialisation); freeze the base; routers ~ N(0, router_std²) from a
    generator seeded by `seed`."""
    modules = dict(model.named_modules())
    missing = [name for name in spec.modules if not isinstance(modules.get(name), nn.Linear)]
    if missing:
        raise MoergeError(f"{MIXTURE_CONFIG}: modules: {missing[0]} is not a linear layer of the base model")
    for param in model.parameters():
        param.requires_grad_(False)
    context = RoutingContext()
    for name in [n for n in modules if n in spec.modules]:
        routed = spec.modules[name] == "routed"
        layer = LoraMixtureLinear(
            modules[name],
            experts=spec.num_experts if routed else 1,
            top_k=spec.top_k if routed else 1,
            rank=spec.rank,
            scaling=spec.scaling,
            dropout=spec.dropout,
            shared_a=spec.variant == "hydralora",
            routed=routed,
            context=context,
        )
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, layer)
    generator = torch.Generator().manual_seed(seed)
    for layer in routed_layers(model).values():
        noise = torch.randn(layer.router.shape, generator=generator) * router_std
        layer.router.data.copy_(noise.to(layer.router.device))
    model.register_forward_pre_hook(context.capture, with_kwargs=True)
    return model


def balance_loss(model: nn.Module) -> torch.Tensor | None:
    """The load-balancing loss of the last forward, averaged over the routed layers (None: none)."""
    values = [layer.aux for layer in routed_layers(model).values() if layer.aux is not None]
    return torch.stack(values).mean() if values else None


@torch.no_grad()
def measure_load(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Share of the (real) tokens' top-k assignments that goes to each expert, per routed layer and
    averaged over layers, with the load's entropy relative to uniform (1: perfectly balanced)."""
    layers = routed_layers(model)
    was_training = model.training
    model.eval()
    for layer in layers.values():
        layer.counting, layer.load_sum, layer.tokens = True, torch.zeros(layer.num_experts), 0
    try:
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for layer in layers.values():
            layer.counting = False
        model.train(was_training)
    per_layer = {name: (m.load_sum / max(1, m.tokens * m.top_k)) for name, m in layers.items()}
    if not per_layer:
        return {}
    mean = torch.stack(list(per_layer.values())).mean(dim=0)
    return {
        "load_per_layer": {name: [round(float(v), 4) for v in load] for name, load in per_layer.items()},
        "load_mean": [round(float(v), 4) for v in mean],
        "load_entropy": round(sum(load_entropy(load) for load in per_layer.values()) / len(per_layer), 4),
    }


def load_entropy(load: torch.Tensor) -> float:
    """Entropy of a load vector divided by log K (1: uniform; 0: one expert takes everything)."""
    if load.numel() < 2:
        return 1.0
    p = load / load.sum().clamp(min=1e-12)
    return float(-(p * p.clamp(min=1e-12).log()).sum() / math.log(load.numel()))


def mixture_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The mixture's own weights (experts and routers; the frozen base excluded), keyed by module."""
    out = {}
    for name, layer in mixture_layers(model).items():
        for key, param in layer.named_parameters():
            if not key.startswith("base_layer."):
                out[f"{name}.{key}"] = param.detach().float().cpu().contiguous()
    return out


def save_mixture(model: nn.Module, spec: MixtureSpec, out: Path) -> None:
    from safetensors.torch import save_file

    from moerge.paths import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    save_file(mixture_state(model), str(out / MIXTURE_WEIGHTS))
    write_json_atomic(out / MIXTURE_CONFIG, spec.model_dump(mode="json"))


def read_mixture_spec(folder: Path) -> MixtureSpec:
    path = Path(folder) / MIXTURE_CONFIG
    if not path.is_file():
        raise MoergeError(f"{path}: not found (is {folder} a mixture expert?)")
    return validate(MixtureSpec, parse_json(path.read_bytes(), path), str(path))


def load_mixture(model: nn.Module, folder: Path) -> nn.Module:
    """Put the mixture expert at `folder` on `model` (a loaded base): safetensors only, every expected
    tensor present with its shape, no extra ones, all finite."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    spec = read_mixture_spec(folder)
    weights = folder / MIXTURE_WEIGHTS
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, FileNotFoundError, OSError) as exc:
        raise MoergeError(f"{weights}: could not read the mixture's weights ({exc})") from None
    with torch.random.fork_rng(devices=[]):  # the layers' init is overwritten: leave the caller's RNG alone
        inject_mixture(model, spec)
    expected = mixture_state(model)
    for key in sorted(set(expected) | set(tensors)):
        if key not in tensors:
            raise MoergeError(f"{weights}: lacks tensor {key} that {MIXTURE_CONFIG} implies")
        if key not in expected:
            raise MoergeError(f"{weights}: tensor {key} belongs to no module {MIXTURE_CONFIG} names")
        if tuple(tensors[key].shape) != tuple(expected[key].shape):
            raise MoergeError(
                f"{weights}: {key} has shape {tuple(tensors[key].shape)}, the base needs {tuple(expected[key].shape)}"
            )
        if not torch.isfinite(tensors[key]).all():
            raise MoergeError(f"{weights}: {key} holds NaN or infinite values")
    params = {f"{name}.{key}": p for name, m in mixture_layers(model).items() for key, p in m.named_parameters()}
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(value.to(params[key].dtype))
    return model.eval()


def as_peft_lora(spec: MixtureSpec, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A one-expert mixture as peft LoRA files (adapter_config.json's content, adapter_model.safetensors'
    tensors): with one expert the gate is exactly 1, so it is that LoRA."""
    if spec.num_experts != 1:
        raise MoergeError(f"num_experts: {spec.num_experts}: only a one-expert mixture is a plain LoRA")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in spec.modules}),
        "bias": "none",
        "fan_in_fan_out": False,
    }
    out = {}
    for key, value in tensors.items():
        module, _, rest = key.partition(".lora_")
        if rest:
            factor = rest.split(".", 1)[0]
            out[f"base_model.model.{module}.lora_{factor}.weight"] = value
    return config, out


def export_peft_lora(folder: Path, out: Path) -> None:
    """Write the one-expert mixture at `folder` as a plain peft LoRA folder `out` (`as_peft_lora`)."""
    from safetensors.torch import load_file, save_file

    from moerge.paths import write_json_atomic

    config, tensors = as_peft_lora(read_mixture_spec(folder), load_file(str(Path(folder) / MIXTURE_WEIGHTS)))
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    write_json_atomic(out / "adapter_config.json", config)
