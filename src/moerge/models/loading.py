"""Loading a base model and tokenizer, and fingerprinting it so experts know their base."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from moerge.errors import MoergeError
from moerge.models.sources import resolve_base

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_SAMPLED_TENSORS = 6
_SAMPLED_VALUES = 4096


def load_base(
    name_or_path: str | Path, *, dtype: str = "float32", device: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a cached name, folder or hub id."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # moerge shows its own progress; per-file bars are noise
    hf_logging.set_verbosity_error()
    where = resolve_base(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=getattr(torch, dtype))
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MoergeError(
            f"could not load base model {name_or_path!r} (not a cached name, a local folder, "
            f"or a reachable hub id): {first}"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device:
        model.to(device)
    model.eval()
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
        values = get().detach().flatten()[:_SAMPLED_VALUES].to(torch.bfloat16)
        digest.update(values.view(torch.int16).numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:32]


def fingerprint(model_or_path: PreTrainedModel | str | Path) -> str:
    """A stable id for a base model's weights, the same for its folder and the loaded model."""
    if not isinstance(model_or_path, (str, Path)):
        model = getattr(model_or_path, "get_base_model", lambda: model_or_path)()
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


def _safetensors_entries(folder: Path) -> list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MoergeError(f"{folder}: no *.safetensors weights to fingerprint")
    entries = []
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                shape = tuple(fh.get_slice(key).get_shape())
                entries.append((key, shape, (lambda f=file, k=key: _read_tensor(f, k))))
    return entries


def _read_tensor(file: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:
        return fh.get_tensor(key)
