"""Loading a base model and tokenizer, fingerprinting it so experts know their base, and the one way
moerge reads and writes safetensors files.

Weights are read from safetensors only (`use_safetensors=True`; pickled folders are refused by
`resolve_base`). `check_finite` is the one check that refuses NaN/inf tensors: every writer of weights
(merges, training, routers) calls it before writing, and `read_safetensors` after reading.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moerge.errors import MoergeError
from moerge.models.precision import (
    check_quantize,
    dtype_name,
    is_quantized,
    quantization_config,
    resolve_device,
    resolve_dtype,
    torch_dtype,
)
from moerge.models.sources import resolve_base

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_SAMPLED_TENSORS = 6
_SAMPLED_VALUES = 4096


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """The base model's tokenizer alone (with a pad token), for work that renders prompts only."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # moerge shows its own progress; per-file bars are noise
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_base(name_or_path))
    except (OSError, ValueError) as exc:  # ValueError: a broken tokenizer/config file, unknown model_type
        raise _unloadable(name_or_path, exc) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _unloadable(name_or_path: str | Path, exc: Exception) -> MoergeError:
    return MoergeError(
        f"could not load base model {name_or_path!r} (not a cached name, a local folder, "
        f"or a reachable hub id with safetensors weights): {_first_line(exc)}"
    )


@dataclass
class LoadDefaults:
    """What `load_base` uses where its caller gives nothing: fp32, left where transformers puts it (CPU).
    The inference commands (eval, generate, serve) set it once from --dtype/--device/--device-map
    (`set_load_defaults`), so every model they load — the base, an expert's base, a router's — follows."""

    dtype: str = "fp32"
    device: str | None = None
    device_map: str | None = None


_DEFAULTS = LoadDefaults()
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def set_load_defaults(*, dtype: str | None = None, device: str | None = None, device_map: str | None = None) -> None:
    """Set the process-wide loading defaults (None leaves a setting as it is); bad names are one line."""
    if dtype is not None:
        _DEFAULTS.dtype = dtype_name(dtype)
    if device is not None:
        resolve_device(device)  # refuse an absent device now, before anything loads
        _DEFAULTS.device = device
    if device_map is not None:
        _DEFAULTS.device_map = _checked_device_map(device_map)


def load_defaults() -> LoadDefaults:
    return LoadDefaults(_DEFAULTS.dtype, _DEFAULTS.device, _DEFAULTS.device_map)


def _checked_device_map(device_map: str) -> str:
    if device_map not in DEVICE_MAPS:
        raise MoergeError(f"--device-map: {device_map!r} is not one of {', '.join(DEVICE_MAPS)}")
    return device_map


def load_base(
    name_or_path: str | Path,
    *,
    dtype: str | None = None,
    device: str | None = None,
    device_map: str | None = None,
    quantize: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a cached name, folder or hub id.

    `dtype`: auto, bf16, fp16, fp32 (or a torch name); `device`: auto, cuda, cpu, mps; `device_map`:
    accelerate's placement over the visible devices (`auto`: for models that do not fit one device);
    `quantize`: 4bit or 8bit through bitsandbytes (CUDA only). What is not given comes from
    `set_load_defaults` (fp32, not moved, unless an inference command set it)."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    device = device if device is not None else _DEFAULTS.device
    device_map = _checked_device_map(device_map) if device_map is not None else _DEFAULTS.device_map
    target = resolve_device(device) if device or device_map or quantize else "cpu"
    name = resolve_dtype(dtype if dtype is not None else _DEFAULTS.dtype, target)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(name), "use_safetensors": True}
    if quantize:
        check_quantize(quantize, target)
        kwargs.update(quantization_config=quantization_config(quantize, name), device_map={"": torch.device(target)})
    elif device_map:
        kwargs["device_map"] = device_map
    tokenizer = load_tokenizer(name_or_path)
    where = resolve_base(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as exc:
        raise _unloadable(name_or_path, exc) from None
    except SafetensorError as exc:
        raise MoergeError(f"{where}: a weights file is not a readable safetensors file ({_first_line(exc)})") from None
    if device and "device_map" not in kwargs:
        model.to(target)
    model.eval()
    stored = ((n, p) for n, p in model.state_dict().items() if p.device.type != "meta")  # offloaded: not here
    check_finite(stored, where, "the base model's weights are damaged")
    return model, tokenizer


def _canonical(name: str) -> str:
    for prefix in ("base_model.model.", "model.model.", "_orig_mod."):
        if name.startswith(prefix):
            name = "model." + name[len(prefix) :] if prefix == "model.model." else name[len(prefix) :]
    return name


def _digest(named: Iterable[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]) -> str:
    """Hash names, shapes and a sample of values (as bf16) so dtype and tying don't matter."""
    import torch

    items = sorted((_canonical(n), s, get) for n, s, get in named if not _canonical(n).startswith("lm_head"))
    digest = hashlib.sha256()
    for name, shape, _ in items:
        digest.update(f"{name}:{list(shape)};".encode())
    step = max(1, len(items) // _SAMPLED_TENSORS)
    for _, _, get in items[::step][:_SAMPLED_TENSORS]:
        values = get().detach().flatten()[:_SAMPLED_VALUES].cpu().to(torch.bfloat16)
        digest.update(values.view(torch.int16).numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:32]


def fingerprint(model_or_path: PreTrainedModel | str | Path) -> str:
    """A stable id for a base model's weights, the same for its folder and the loaded model."""
    if not isinstance(model_or_path, (str, Path)):
        model = getattr(model_or_path, "get_base_model", lambda: model_or_path)()
        stored = _stored_folder(model) if _values_not_stored(model) else None
        if stored is not None:
            return fingerprint(stored)
        params = [
            (n, tuple(p.shape), (lambda p=p: p))
            for n, p in model.state_dict().items()
            if "lora_" not in n and "ia3_" not in n
        ]
        return _digest(params)
    folder = Path(resolve_base(model_or_path))
    if not folder.is_dir():
        raise MoergeError(f"{model_or_path}: fingerprint needs a local model folder or a loaded model")
    return _digest(_safetensors_entries(folder))


def _values_not_stored(model: PreTrainedModel) -> bool:
    """Whether sampling the loaded values would not give the stored ones' bf16 rounding: a quantised base
    (packed integers), or one loaded in fp16 (bf16 values below fp16's normal range lose bits)."""
    import torch

    return is_quantized(model) or any(p.dtype == torch.float16 for p in model.parameters())


def _stored_folder(model: PreTrainedModel) -> Path | None:
    """The local folder (or hub cache snapshot) a model was loaded from, to fingerprint its stored weights;
    None when it cannot be found (then the loaded values are fingerprinted)."""
    source = str(getattr(model.config, "_name_or_path", "") or "")
    if source and Path(source).is_dir():
        return Path(source)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True, allow_patterns=["*.safetensors", "*.json"]))
    except Exception:  # not a hub id, or not in the cache: fall back to the values
        return None


def _safetensors_entries(folder: Path) -> list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MoergeError(f"{folder}: no *.safetensors weights to fingerprint")
    return [
        (key, shape, (lambda f=file, k=key: _read_tensor(f, k)))
        for file in files
        for key, shape in safetensors_shapes(file).items()
    ]


def _read_tensor(file: Path, key: str) -> torch.Tensor:
    with open_safetensors(file) as fh:
        return fh.get_tensor(key)


def base_layer_shapes(name_or_path: str | Path) -> dict[str, tuple[int, ...]]:
    """Module name → weight shape of every 2-D `*.weight` of a local base model, from its safetensors
    headers alone (no tensor is read). A tied output head (no `lm_head.weight` stored) takes the input
    embedding's shape, as the loaded model's does."""
    folder = Path(resolve_base(name_or_path))
    if not folder.is_dir():
        raise MoergeError(f"{name_or_path}: checking shapes needs a local model folder")
    layers = {}
    for file in sorted(folder.glob("*.safetensors")):
        for key, shape in safetensors_shapes(file).items():
            if key.endswith(".weight") and len(shape) == 2:
                layers[_canonical(key).removesuffix(".weight")] = shape
    if "lm_head" not in layers and "model.embed_tokens" in layers:
        layers["lm_head"] = layers["model.embed_tokens"]
    return layers


# --------------------------------------------------------------------------- safetensors files


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class SafetensorsFile:
    """An open safetensors file whose read failures are one MoergeError naming it (`open_safetensors`
    closes it after a block; `SafetensorsFile.open` keeps it open, like `safe_open`)."""

    def __init__(self, path: Path, handle: Any) -> None:
        self.path = path
        self.handle = handle

    @classmethod
    def open(cls, path: str | Path) -> SafetensorsFile:
        """`safe_open(path)`; a damaged or truncated file is one MoergeError naming it."""
        from safetensors import SafetensorError, safe_open

        try:
            return cls(Path(path), safe_open(str(path), framework="pt"))
        except (SafetensorError, OSError) as exc:
            raise _unreadable(Path(path), exc) from None

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.handle.keys()))

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.handle.get_slice(key).get_shape())

    def get_tensor(self, key: str) -> torch.Tensor:
        from safetensors import SafetensorError

        try:
            return self.handle.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise _unreadable(self.path, exc) from None


def _unreadable(path: Path, exc: BaseException) -> MoergeError:
    if isinstance(exc, FileNotFoundError):
        return MoergeError(f"{path}: not found")
    return MoergeError(f"{path}: not a readable safetensors file ({_first_line(exc)})")


@contextlib.contextmanager
def open_safetensors(path: str | Path) -> Iterator[SafetensorsFile]:
    """A `SafetensorsFile` for the block (closed after it)."""
    reader = SafetensorsFile.open(path)
    with reader.handle:
        yield reader


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the header alone."""
    with open_safetensors(path) as fh:
        return {key: fh.shape(key) for key in fh}


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, refused (one MoergeError naming the file) when the file is
    damaged or a tensor holds NaN/inf."""
    with open_safetensors(path) as fh:
        tensors = {key: fh.get_tensor(key) for key in fh}
    check_finite(tensors, path)
    return tensors


def check_finite(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], where: object, hint: str = ""
) -> None:
    """The one check that weights are usable numbers: refuse any floating tensor holding NaN or ±inf,
    naming `where` (the file or folder) and the tensor; `hint` (e.g. what to change) ends the message."""
    import torch

    for name, tensor in tensors.items() if isinstance(tensors, Mapping) else tensors:
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        bad = tensor.numel() - int(torch.isfinite(tensor).sum())
        if bad:
            raise MoergeError(
                f"{where}: tensor {name}: {bad} of {tensor.numel()} values are NaN or infinite;"
                f" {hint or 'refusing to use it'}"
            )


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write `tensors` to `path` after `check_finite` (a NaN/inf tensor is never written)."""
    from safetensors.torch import save_file

    check_finite(tensors, path)
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path), metadata)
