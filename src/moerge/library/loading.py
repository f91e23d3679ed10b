"""Loading a base model with an expert applied, refusing corrupted or mismatched experts.

`attach_adapter` is the one way an adapter folder is put on a loaded model (evaluation, generation,
comparison, and training that continues or merges earlier adapters): the folder is opened by the one
reader (`open_adapter`: safetensors only, files checked against `moerge.json`, config types), its
values are checked finite, a LoRA's modules are checked against the model, and only then does peft
load it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from moerge.errors import MoergeError
from moerge.library.adapter import LoraAdapter, PeftAdapter, RecordedBase, check_same_base, open_adapter
from moerge.library.expert import check_expert_intact, is_expert_folder, read_expert_meta
from moerge.models.loading import fingerprint, load_base

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def load_model(
    base: str | Path, adapter: str | Path | None = None, *, device: str | None = None, merge: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base alone, or with the expert at `adapter` (a moerge expert or any peft adapter folder).

    The expert's recorded base fingerprint must be the base's (`check_same_base`).
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
        recorded = RecordedBase(meta.name, folder, meta.base.fingerprint)
        check_same_base([recorded], fingerprint(base), base_name=f"--base {base}")
        return load_base(folder, device=device)
    if is_expert_folder(folder) and read_expert_meta(folder).kind == "mixture":
        return _load_mixture(base, folder, device)
    expert = open_adapter(folder)
    model, tokenizer = load_base(base, device=device)
    if expert.meta is not None:
        check_same_base([expert], fingerprint(model), base_name=f"--base {base}")
    peft_model = attach_adapter(model, expert)
    return (peft_model.merge_and_unload() if merge else peft_model), tokenizer


def _load_mixture(
    base: str | Path, folder: Path, device: str | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A trained mixture (`models.mixture`): its files checked against moerge.json, its base against the
    recorded fingerprint, then its layers injected (a mixture cannot be merged into the weights)."""
    from moerge.models.mixture import load_mixture

    meta = check_expert_intact(folder)
    model, tokenizer = load_base(base, device=device)
    check_same_base(
        [RecordedBase(meta.name, folder, meta.base.fingerprint)], fingerprint(model), base_name=f"--base {base}"
    )
    return load_mixture(model, folder), tokenizer


def attach_adapter(
    model: PreTrainedModel, adapter: PeftAdapter | str | Path, *, trainable: bool = False
) -> PreTrainedModel:
    """peft applies the adapter (a folder is opened with `open_adapter` first): its tensors checked
    finite, a LoRA's modules checked against the model. `trainable` keeps training it."""
    from peft import PeftModel
    from safetensors import SafetensorError

    if not isinstance(adapter, PeftAdapter):
        adapter = open_adapter(adapter)
    adapter.check_values()
    if isinstance(adapter, LoraAdapter):
        adapter.check_against(model)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft_model = PeftModel.from_pretrained(model, str(adapter.folder), is_trainable=trainable)
    except SafetensorError as exc:
        raise MoergeError(f"{adapter.weights_path}: corrupted safetensors file ({exc})") from None
    except (ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MoergeError(f"{adapter.folder}: could not load adapter: {first}") from None
    _refuse_missing_weights(adapter, caught)
    if not trainable:
        peft_model.eval()
    return peft_model


def _refuse_missing_weights(adapter: PeftAdapter, caught: list[warnings.WarningMessage]) -> None:
    """peft only warns when the weights file lacks modules the config targets, and then scores those
    modules as the base; such an adapter is refused. Other warnings are passed on."""
    for warning in caught:
        text = str(warning.message)
        if "missing adapter keys" in text:
            first = text.split("[", 1)[-1].split(",")[0].strip(" '].")
            raise MoergeError(
                f"{adapter.weights_path}: lacks weights of modules adapter_config.json targets (e.g. {first})"
            )
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
