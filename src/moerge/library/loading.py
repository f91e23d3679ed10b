"""Loading a base model with an expert applied, refusing corrupted or mismatched experts."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from moerge.errors import MoergeError
from moerge.library.adapter import LoraAdapter, PeftAdapter, open_adapter
from moerge.library.expert import check_expert_intact, is_expert_folder, read_expert_meta
from moerge.models.loading import fingerprint, load_base

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def load_model(
    base: str | Path, adapter: str | Path | None = None, *, device: str | None = None, merge: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base alone, or with the expert at `adapter` (a moerge expert or any peft adapter folder).

    `merge=True` folds the adapter into the weights (peft's `merge_and_unload`): the same function,
    but inference runs at the base model's speed instead of paying for ~200 LoRA side paths.
    """
    if adapter is None:
        return load_base(base, device=device)
    folder = Path(adapter)
    if not folder.is_dir():
        raise MoergeError(f"{folder}: expert folder not found")
    if is_expert_folder(folder) and read_expert_meta(folder).kind == "full":
        meta = check_expert_intact(folder)
        model, tokenizer = load_base(folder, device=device)
        _check_base(meta.base.fingerprint, fingerprint(base), folder, base)
        return model, tokenizer
    expert = open_adapter(folder)
    model, tokenizer = load_base(base, device=device)
    if expert.meta is not None:
        _check_base(expert.fingerprint, fingerprint(model), folder, base)
    peft_model = _attach_adapter(model, expert)
    return (peft_model.merge_and_unload() if merge else peft_model), tokenizer


def _check_base(expected: str, actual: str, folder: Path, base: str | Path) -> None:
    if expected not in ("unknown", actual):
        raise MoergeError(
            f"{folder}: expert was trained on base {expected}, but --base {base} has fingerprint {actual}"
        )


def _attach_adapter(model: PreTrainedModel, adapter: PeftAdapter) -> PreTrainedModel:
    """peft applies the adapter `open_adapter` validated (a LoRA's modules checked against the model first)."""
    from peft import PeftModel
    from safetensors import SafetensorError

    if isinstance(adapter, LoraAdapter):
        adapter.check_against(model)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter.folder))
    except SafetensorError as exc:
        raise MoergeError(f"{adapter.weights_path}: corrupted safetensors file ({exc})") from None
    except (ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MoergeError(f"{adapter.folder}: could not load adapter: {first}") from None
    peft_model.eval()
    return peft_model
