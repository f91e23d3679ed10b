"""The stacked-expert layer: K LoRA experts of one linear held in contiguous tensors.

Every router runs on this one layer. A [K, r_max, in] and B [K, out, r_max] hold all experts (ranks
padded with zeros, LoRA scaling folded into A as `LoraAdapter.factors` returns it, a missing module
is an all-zero expert), so the
routed update Σ_k w_k B_k A_k x is two matrix products for any routing weights — no Python loop over
experts or tokens.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moerge.data.formats import Recorded as RecordedFormat
from moerge.data.formats import combined
from moerge.errors import MoergeError
from moerge.library.adapter import LoraAdapter, check_same_base

WeightFn = Callable[[str, torch.Tensor], torch.Tensor]
_CONTEXT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("moerge_routing", default=None)


@contextlib.contextmanager
def routing_context(**values: Any) -> Iterator[None]:
    """Per-call routing inputs, e.g. `task_ids=[...]` (one per example) or `task_descriptions=[...]`.

    A context variable rather than a forward argument, so `generate` and plain forwards work unchanged.
    """
    token = _CONTEXT.set({**(_CONTEXT.get() or {}), **values})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current_context() -> dict[str, Any]:
    return dict(_CONTEXT.get() or {})


@dataclass
class SparseRouting:
    """Top-k routing: `indices` and `weights` of shape [..., k] over K experts."""

    indices: torch.Tensor
    weights: torch.Tensor

    def dense(self, num_experts: int) -> torch.Tensor:
        out = self.weights.new_zeros((*self.weights.shape[:-1], num_experts))
        return out.scatter_add(-1, self.indices, self.weights)


# --------------------------------------------------------------------------- attached experts


@dataclass(frozen=True)
class StackedExpert:
    """One attached expert: the name routers use and its folder. Its factors live in the stacked layers;
    its adapter file is not kept open (a mapped file would count in the process's resident memory)."""

    name: str
    folder: Path
    prompt_format: RecordedFormat


# --------------------------------------------------------------------------- the layer


class StackedLoRALinear(nn.Module):
    """A base nn.Linear plus K stacked experts; routing weights come from the owning `StackedModel`."""

    def __init__(self, base: nn.Linear, name: str, factors: Sequence[tuple[torch.Tensor, torch.Tensor] | None]):
        super().__init__()
        self.base = base
        self.name = name
        ranks = [f[0].shape[0] for f in factors if f is not None]
        r_max, k = max(ranks), len(factors)
        dtype, device = base.weight.dtype, base.weight.device
        a = torch.zeros(k, r_max, base.in_features, dtype=dtype, device=device)
        b = torch.zeros(k, base.out_features, r_max, dtype=dtype, device=device)
        for i, pair in enumerate(factors):
            if pair is not None:
                r = pair[0].shape[0]
                a[i, :r] = pair[0].to(dtype)
                b[i, :, :r] = pair[1].to(dtype)
        self.register_buffer("A", a)
        self.register_buffer("B", b)
        # [out, K*r] so the mixed update is one matmul; fixed after construction.
        self.register_buffer("B_flat", b.permute(1, 0, 2).reshape(base.out_features, k * r_max), persistent=False)
        self.register_buffer("present", torch.tensor([f is not None for f in factors], device=device))
        self.weight_fn: WeightFn | None = None
        self.merge = False  # per-example parameter merging instead of output mixing

    @property
    def num_experts(self) -> int:
        return self.A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.weight_fn is None:
            return out
        weights = self.weight_fn(self.name, x)
        if weights is None:
            return out
        return out + self.delta(x, weights, merge=self.merge).to(out.dtype)

    def delta(self, x: torch.Tensor, weights: torch.Tensor | SparseRouting, *, merge: bool = False) -> torch.Tensor:
        """Σ_k w_k B_k A_k x. `weights`: [b, s, K] per token, [b, K] per example, or SparseRouting.

        `merge=True` (per-example weights only) applies each example's merged update ΔW_b = Σ w B A. As
        LoRA is linear this equals output mixing; it is computed from the gathered factors of the
        selected experts (ΔW_b x = [w·B_sel][A_sel x]) rather than by forming ΔW_b.
        """
        if isinstance(weights, SparseRouting):
            if merge and weights.indices.dim() == 2:
                return self._merged(x, weights.indices, weights.weights)
            weights = weights.dense(self.num_experts)
        weights = weights.to(self.A.dtype)
        if merge:
            if weights.dim() != 2:
                raise MoergeError("aggregation 'merge' needs per-example weights (granularity example or task)")
            k = int((weights != 0).sum(-1).max().clamp(min=1))
            top, idx = weights.topk(k, dim=-1)
            return self._merged(x, idx, top)
        if weights.dim() == x.dim() - 1:
            weights = weights.unsqueeze(-2)
        h = F.linear(x.to(self.A.dtype), self.A.reshape(-1, self.A.shape[-1]))
        h = (h.unflatten(-1, self.A.shape[:2]) * weights.unsqueeze(-1)).flatten(-2)
        return F.linear(h, self.B_flat)

    def _merged(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Per example: gather its experts' factors [b, k·r, in] / [b, out, k·r] and apply with bmm."""
        a_sel = self.A[idx].flatten(1, 2)
        b_sel = (self.B[idx] * w.to(self.B.dtype)[:, :, None, None]).permute(0, 2, 1, 3).flatten(2)
        h = torch.bmm(x.to(self.A.dtype), a_sel.transpose(1, 2))
        return torch.bmm(h, b_sel.transpose(1, 2))


# --------------------------------------------------------------------------- the model handle


@dataclass
class Step:
    """What the current forward pass knows about its inputs (set by a pre-forward hook)."""

    input_ids: torch.Tensor | None
    mask: torch.Tensor | None  # [b, s] non-padding positions of the tokens in this forward
    prefill: bool
    context: dict[str, Any] = field(default_factory=dict)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


class StackedModel:
    """Handle to a transformers model whose target linears were replaced by stacked-expert layers.

    `weight_fn(module, x)` decides the routing weights of every layer; routers install one via
    `moerge.route.routing.Routing`. `step` describes the current forward (padding mask, prefill or
    decode, routing context), so example-level routing can be computed once on the prompt.
    """

    def __init__(self, model: nn.Module, experts: list[StackedExpert], layers: dict[str, StackedLoRALinear]):
        self.model = model
        self.experts = experts
        self.layers = layers
        self.step = Step(None, None, True)
        self.enabled = True
        self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    @property
    def prompt_format(self) -> RecordedFormat:
        """The experts' prompt format: theirs when they agree, else `mixed` (or `unknown`)."""
        return combined([e.prompt_format for e in self.experts])

    def set_weight_fn(self, fn: WeightFn | None) -> None:
        for layer in self.layers.values():
            layer.weight_fn = fn if fn is None else self._gated(fn)

    def _gated(self, fn: WeightFn) -> WeightFn:
        return lambda name, x: fn(name, x) if self.enabled else None

    def set_weights(self, weights: torch.Tensor | SparseRouting) -> None:
        """Fixed routing weights for every layer ([b, K], [b, s, K] or sparse) — manual mixing."""
        self.set_weight_fn(lambda name, x: weights)

    @contextlib.contextmanager
    def experts_off(self) -> Iterator[None]:
        """Run the bare base model (used to embed inputs for routers)."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.enabled:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shape = ids.shape if ids is not None else embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        mask = torch.ones(shape, dtype=torch.bool) if mask is None else mask[:, -shape[1] :].bool()
        cache = kwargs.get("cache")  # transformers 5 `generate` passes `cache=`; older ones `past_key_values=`
        if cache is None:
            cache = kwargs.get("past_key_values")
        prefill = cache is None or cache.get_seq_length() == 0
        self.step = Step(ids, mask, prefill, current_context())

    def detach(self) -> nn.Module:
        """Put the original linears back and return the plain model."""
        for name, layer in self.layers.items():
            parent, child = _parent(self.model, name)
            setattr(parent, child, layer.base)
        self._hook.remove()
        del self.model.moerge_routing
        return self.model


def attach_experts(
    model: nn.Module,
    expert_folders: Sequence[str | Path] | Mapping[str, str | Path],
    *,
    base_fingerprint: str | None = None,
) -> StackedModel:
    """Replace every linear that any expert adapts with a stacked-expert layer, in place.

    Expert order is the order given; names come from the mapping keys, `moerge.json`, or folder names.
    The experts' recorded bases must agree with each other and with `model`'s fingerprint
    (`check_same_base`; `base_fingerprint` saves computing it again when the caller has it).
    """
    if isinstance(getattr(model, "moerge_routing", None), StackedModel):
        raise MoergeError("the model already has experts attached: call model.moerge_routing.detach() first")
    items = expert_folders.items() if isinstance(expert_folders, Mapping) else [(None, f) for f in expert_folders]
    adapters = [LoraAdapter.open(folder, name).require_plain("the stacked-expert layer") for name, folder in items]
    if not adapters:
        raise MoergeError("no experts given: routing needs at least one expert folder")
    names = [a.label for a in adapters]
    if len(set(names)) != len(names):
        raise MoergeError(f"expert names must be unique, got {names}")
    if base_fingerprint is None:
        from moerge.models import fingerprint

        base_fingerprint = fingerprint(model)
    base_name = getattr(getattr(model, "config", None), "_name_or_path", "") or "the base model"
    check_same_base(adapters, base_fingerprint, base_name=f"the base model {base_name}")
    targets = {module: name for a in adapters for module, name in a.check_against(model).items()}
    layers: dict[str, StackedLoRALinear] = {}
    for module in sorted(targets):
        name = targets[module]
        parent, child = _parent(model, name)
        layer = StackedLoRALinear(getattr(parent, child), name, [a.factors(module) for a in adapters])
        setattr(parent, child, layer)
        layers[name] = layer
    handle = StackedModel(model, [StackedExpert(a.label, a.folder, a.prompt_format) for a in adapters], layers)
    model.moerge_routing = handle
    return handle
