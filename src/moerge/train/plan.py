"""`moerge plan` / `moerge train --dry-run`: parameter counts and a peak-memory estimate, before loading weights.

The model is built from its config on the meta device (no tensor is allocated), the training method is
applied to it, and parameters are counted. Peak memory of a training step is estimated as

    weights      frozen params × bytes(dtype)         (4bit: 0.53 B, 8bit: 1.03 B per linear-layer weight;
                                                        the rest fp32, as peft's k-bit preparation casts it)
    trainable    trainable params × 16 B              (fp32 weight + fp32 grad + AdamW's two fp32 moments;
                                                        + 2 B for autocast's low-precision copy when they
                                                        are the base's own weights)
    activations  L × b × s × (a_h·h + a_I·I)          per token and layer, in bytes
                 with checkpointing: L × b × s × h × bytes(dtype) (each layer's input), plus what one
                 layer's recomputed set exceeds the logits by (the backward recomputes a layer only after
                 the logits and their gradient are freed)
    logits       b × s × V × 12 B                     (logits, their fp32 log-softmax and its gradient)

with L layers, h hidden size, I the MLP's intermediate size, V the vocabulary, b the (micro-)batch and
s = max_length. a_h, a_I are calibrated on CPU with Llama-shaped models (tests/train/test_plan.py checks
the estimate within 25% of measured peak RSS): fp32 a_h = 38, a_I = 16; bf16/fp16 a_h = 29, a_I = 8
(RMSNorm and the LoRA side paths keep fp32 copies, so halving the dtype does not halve the activations).
The estimate is an upper bound for short examples: it assumes every sequence is max_length tokens long
and every position is scored (a fine-tuning task scores its answer tokens only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moerge.errors import MoergeError
from moerge.models.precision import BYTES, resolve_device, resolve_dtype
from moerge.train.methods import get_method
from moerge.train.methods.base import InitData

if TYPE_CHECKING:
    from torch import nn

    from moerge.train.config import TrainConfig

ACTIVATION_BYTES = {"fp32": (38.0, 16.0), "bf16": (29.0, 8.0), "fp16": (29.0, 8.0)}
"""(a_h, a_I): bytes kept per token and layer per hidden unit and per MLP unit (calibrated, see above)."""
LOGIT_BYTES = 12.0
QUANTIZED_BYTES = {"4bit": 0.53, "8bit": 1.03}
CUDA_CONTEXT_BYTES = 600 * 2**20
"""What a CUDA process holds before any tensor (context, cuBLAS workspaces): added when checking the fit."""


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model, from its config and a meta-device build."""

    architecture: str
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    total_params: int
    linear_params: int  # weights of the decoder layers' linear modules (what bitsandbytes quantises)


@dataclass(frozen=True)
class MemoryPlan:
    """Parameter counts, the peak-memory estimate of one training step, and whether it fits here."""

    base: str
    method: str
    shape: ModelShape
    trainable_params: int
    trainable_is_base: bool
    dtype: str
    quantize: str | None
    batch_size: int
    grad_accum: int
    max_length: int
    checkpointing: bool
    weights_bytes: int
    trainable_bytes: int
    activation_bytes: int
    logits_bytes: int
    device: str
    available_bytes: int | None
    overhead_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.trainable_bytes + self.activation_bytes + self.logits_bytes

    @property
    def fits(self) -> bool | None:
        if self.available_bytes is None:
            return None
        return self.peak_bytes + self.overhead_bytes <= self.available_bytes

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(peak_bytes=self.peak_bytes, fits=self.fits)
        return out

    def render(self) -> str:
        s = self.shape
        share = self.trainable_params / max(1, s.total_params)
        held = f"{self.quantize} (linear layers) + fp32 rest" if self.quantize else self.dtype
        lines = [
            f"plan: {self.method} on {self.base} ({s.architecture}, {s.layers} layers, hidden {s.hidden},"
            f" MLP {s.intermediate}, vocabulary {s.vocab:,})",
            f"  parameters: {_count(s.total_params)} total, {_count(self.trainable_params)} trainable ({share:.2%})",
            f"  setting: base in {held}, compute {self.dtype}, trainable weights and AdamW state fp32;"
            f" batch {self.batch_size} × {self.max_length} tokens, grad-accum {self.grad_accum}"
            f" (effective batch {self.batch_size * self.grad_accum}),"
            f" gradient checkpointing {'on' if self.checkpointing else 'off'}",
            f"  peak memory estimate: {_size(self.peak_bytes)}",
            f"    base weights   {_size(self.weights_bytes):>10}",
            f"    trainable      {_size(self.trainable_bytes):>10}  (weights + grads + AdamW moments, fp32)",
            f"    activations    {_size(self.activation_bytes):>10}",
            f"    logits         {_size(self.logits_bytes):>10}",
            f"  {self._verdict()}",
        ]
        return "\n".join(lines)

    def _verdict(self) -> str:
        if self.available_bytes is None:
            return f"device: {self.device} (free memory unknown)"
        need = self.peak_bytes + self.overhead_bytes
        where = f"device: {self.device}, {_size(self.available_bytes)} available, {_size(need)} needed"
        if self.quantize and not self.device.startswith("cuda"):
            return f"{where} → cannot run here: --quantize needs a CUDA GPU"
        if self.fits:
            return f"{where} → fits"
        hints = [] if self.checkpointing else ["--gradient-checkpointing"]
        hints += ["a smaller --batch-size with --grad-accum"] if self.batch_size > 1 else []
        hints += [] if self.dtype != "fp32" else ["--dtype bf16"]
        hints += [] if self.quantize else ["--quantize 4bit (CUDA)"]
        return f"{where} → does not fit; try {', '.join(hints) or 'a shorter --max-length'}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def meta_model(base: str) -> nn.Module:
    """The base model's architecture with every parameter on the meta device (nothing is read or allocated)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from moerge.models import resolve_base

    where = resolve_base(base)
    try:
        config = AutoConfig.from_pretrained(where)
    except (OSError, ValueError) as exc:
        raise MoergeError(f"could not read the config of base model {base!r}: {str(exc).splitlines()[0]}") from None
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # a tied output head is the input embedding: counted once, as when loaded
    return model


def model_shape(model: nn.Module) -> ModelShape:
    from torch import nn

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
    layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0))
    if not hidden or not layers:
        raise MoergeError(f"plan: cannot tell the layers and hidden size of {type(model).__name__} from its config")
    intermediate = int(getattr(config, "intermediate_size", 0) or getattr(config, "n_inner", 0) or 4 * hidden)
    output = model.get_output_embeddings()
    linear = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not output and m.weight.ndim == 2
    )
    total = sum(p.numel() for p in model.parameters())
    return ModelShape(type(model).__name__, layers, hidden, intermediate, int(config.vocab_size), total, linear)


def trainable_model(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """`model` (on the meta device) as `cfg.method` would train it. Data-driven and SVD initialisations are
    replaced by a plain init of the same shapes: the counts are the same, and nothing needs real weights."""
    from moerge.train.methods.builtin import PeftMethod

    method = get_method(cfg.method)
    method.check(model, cfg)
    if isinstance(method, PeftMethod):
        from peft import get_peft_model

        config = method.make_config(cfg)
        if hasattr(config, "init_lora_weights"):
            config.init_lora_weights = True
        return get_peft_model(model, config)
    return method.prepare(model, cfg, Path(), InitData())


def estimate(
    shape: ModelShape,
    *,
    trainable_params: int,
    trainable_is_base: bool,
    dtype: str,
    quantize: str | None,
    batch_size: int,
    max_length: int,
    checkpointing: bool,
) -> dict[str, int]:
    """The four terms of the peak estimate (see the module docstring), in bytes."""
    frozen = shape.total_params - (trainable_params if trainable_is_base else 0)
    if quantize:
        weights = shape.linear_params * QUANTIZED_BYTES[quantize] + (frozen - shape.linear_params) * 4
    else:
        weights = frozen * BYTES[dtype]
    per_param = 16 + (2 if trainable_is_base and dtype != "fp32" else 0)
    a_h, a_i = ACTIVATION_BYTES[dtype]
    tokens = batch_size * max_length
    layer = tokens * (a_h * shape.hidden + a_i * shape.intermediate)
    logits = tokens * shape.vocab * LOGIT_BYTES
    if checkpointing:  # the recomputed layer is live only once the logits' memory is freed: the larger counts
        activations = shape.layers * tokens * shape.hidden * BYTES[dtype] + max(0.0, layer - logits)
    else:
        activations = shape.layers * layer
    return {
        "weights_bytes": int(weights),
        "trainable_bytes": int(trainable_params * per_param),
        "activation_bytes": int(activations),
        "logits_bytes": int(logits),
    }


def device_memory(device: str) -> tuple[int | None, int]:
    """(bytes available for training on `device`, fixed overhead to add): free CUDA memory and the CUDA
    context; for the CPU, MemAvailable (this process's own use is already out of it) and nothing."""
    import torch

    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return int(free), CUDA_CONTEXT_BYTES
    try:
        import psutil

        return int(psutil.virtual_memory().available), 0
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, 0
    except OSError:
        pass
    return None, 0


def plan_training(cfg: TrainConfig, device: str | None = None) -> MemoryPlan:
    """The plan of one training config on `device` (default: the one training would use)."""
    device = resolve_device(device or "auto")
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.quantize and cfg.dtype == "auto":
        dtype = "bf16"  # a quantised base runs on a GPU, where auto is bf16 (planned from a CPU too)
    model = meta_model(cfg.base)
    shape = model_shape(model)  # before the method adds its own parameters
    model = trainable_model(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_params = sum(p.numel() for p in trainable)
    is_base = get_method(cfg.method).kind == "full"
    terms = estimate(
        shape,
        trainable_params=trainable_params,
        trainable_is_base=is_base,
        dtype=dtype,
        quantize=cfg.quantize,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        checkpointing=cfg.gradient_checkpointing,
    )
    available, overhead = device_memory(device)
    return MemoryPlan(
        base=cfg.base,
        method=cfg.method,
        shape=shape,
        trainable_params=trainable_params,
        trainable_is_base=is_base,
        dtype=dtype,
        quantize=cfg.quantize,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        max_length=cfg.max_length,
        checkpointing=cfg.gradient_checkpointing,
        device=device,
        available_bytes=available,
        overhead_bytes=overhead,
        **terms,
    )
