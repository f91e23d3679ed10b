"""Numeric precision, device choice and quantised bases: the names users give and what they resolve to.

- dtype `auto` is bf16 on a CUDA device that supports it, else fp32 (CPU, MPS, older GPUs): the choice
  that is both fast and safe where it is made. `bf16`, `fp16`, `fp32` are taken as given.
- device `auto` is `cuda` when a CUDA device is visible, else `cpu` (MPS only when asked for: several
  ops moerge uses are still missing there).
- `quantize` (4bit NF4 / 8bit int8, QLoRA style) needs bitsandbytes and a CUDA device; where either is
  missing the refusal is one line saying what to install or where to run.
"""

from __future__ import annotations

import importlib.util
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Literal

from moerge.errors import MoergeError

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    import torch

DtypeName = Literal["auto", "bf16", "fp16", "fp32"]
DeviceName = Literal["auto", "cuda", "cpu", "mps"]
QuantizeName = Literal["4bit", "8bit"]
DTYPE_NAMES = ("auto", "bf16", "fp16", "fp32")
DEVICE_NAMES = ("auto", "cuda", "cpu", "mps")
QUANTIZE_NAMES = ("4bit", "8bit")
_ALIASES = {
    "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "auto": "auto",
}  # fmt: skip
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
QUANTIZE_INSTALL = "pip install moerge[quantize]"
DTYPE_HELP = "auto (bf16 on a CUDA GPU that has it, else fp32), bf16, fp16 or fp32"
DEVICE_HELP = "auto (cuda when visible, else cpu), cuda, cpu or mps"
DEVICE_MAP_HELP = "auto: spread a model too big for one device over the visible GPUs and the CPU (accelerate)"


def dtype_name(dtype: str | torch.dtype) -> str:
    """The short name (auto, bf16, fp16, fp32) of a dtype given as a short name, a torch name or a torch dtype."""
    text = str(dtype).removeprefix("torch.").lower()
    if text not in _ALIASES:
        raise MoergeError(f"dtype: {dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    return _ALIASES[text]


def resolve_device(device: str | None = "auto") -> str:
    """`auto` (or None) → cuda when visible, else cpu; an explicit device that is absent is refused."""
    import torch

    name = (device or "auto").split(":")[0]
    if name not in DEVICE_NAMES:
        raise MoergeError(f"--device: {device!r} is not one of {', '.join(DEVICE_NAMES)}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise MoergeError("--device cuda: no CUDA device is visible to torch on this machine (use cpu or auto)")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise MoergeError("--device mps: Apple's MPS backend is not available on this machine (use cpu or auto)")
    return str(device)


def bf16_supported(device: str) -> bool:
    import torch

    return device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> str:
    """The concrete short name (bf16, fp16, fp32) for `dtype` on `device`; `auto`/None → bf16 where
    supported (CUDA with bf16), else fp32."""
    name = dtype_name(dtype or "auto")
    if name == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return name


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name(name)]


def autocast(device: str, dtype: str) -> AbstractContextManager[Any]:
    """Mixed precision for the forward pass: torch.autocast in `dtype` on the device's type; nothing in fp32."""
    import torch

    if dtype == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=torch_dtype(dtype))


def check_quantize(quantize: str | None, device: str | None = None) -> None:
    """Refuse (one line) a quantised base where it cannot run: bitsandbytes missing, or no CUDA device."""
    if quantize is None:
        return
    import torch

    if quantize not in QUANTIZE_NAMES:
        raise MoergeError(f"--quantize: {quantize!r} is not one of {', '.join(QUANTIZE_NAMES)}")
    if not torch.cuda.is_available() or (device is not None and not device.startswith("cuda")):
        raise MoergeError(
            f"--quantize {quantize}: a quantised base needs a CUDA GPU and bitsandbytes ({QUANTIZE_INSTALL});"
            f" this machine {'has no CUDA device' if not torch.cuda.is_available() else f'runs on {device}'}"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MoergeError(f"--quantize {quantize}: bitsandbytes is not installed ({QUANTIZE_INSTALL})")


def quantization_config(quantize: str, compute_dtype: str) -> Any:
    """transformers' BitsAndBytesConfig: NF4 with double quantisation (QLoRA's choice), or int8."""
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype(compute_dtype),
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def is_quantized(model: Any) -> bool:
    """Whether a loaded model's weights are bitsandbytes-quantised (their values are not the stored ones)."""
    inner = getattr(model, "get_base_model", lambda: model)()
    return bool(getattr(inner, "is_quantized", False) or getattr(inner, "is_loaded_in_4bit", False)) or bool(
        getattr(inner, "is_loaded_in_8bit", False)
    )
