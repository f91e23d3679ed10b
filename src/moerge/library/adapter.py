"""The one reader of peft adapter folders: merging, routing, importing and loading all open experts here.

Only JSON and safetensors are read (pickled `adapter_model.bin` is refused, never unpickled). At open
time the folder's files are checked against `moerge.json` (when there is one), the config's types are
validated (one `<folder>/adapter_config.json: field: message` line), and the safetensors header is
indexed without loading a tensor.

A LoRA's update of module m is Δ = s·B·A with peft's own scaling s = α/r (α/√r with rsLoRA), r and α
taken from `rank_pattern`/`alpha_pattern` when a pattern matches (peft's `get_pattern_key`), else from
`r`/`lora_alpha`, whose defaults are peft's `LoraConfig` defaults. `LoraAdapter.factors` folds s into A.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from safetensors import SafetensorError, safe_open

from moerge.errors import MoergeError
from moerge.library.expert import ExpertMeta, check_expert_intact, is_expert_folder
from moerge.paths import parse_json
from moerge.yamlconf import Source, validate

if TYPE_CHECKING:
    import torch
    from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt")
UNKNOWN = "unknown"

# Config keys whose feature changes the update beyond Δ = s·B·A → what the feature adds.
UNSUPPORTED: dict[str, str] = {
    "use_dora": "DoRA rescales the updated weight by a learned magnitude",
    "lora_bias": "a bias is trained on lora_B",
    "modules_to_save": "whole modules are trained next to the LoRA factors",
    "trainable_token_indices": "embedding rows are trained next to the LoRA factors",
    "target_parameters": "LoRA targets bare parameters, not layers",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "layer_replication": "layers of the base are replicated",
    "fan_in_fan_out": "layers store their weight as (in, out) (GPT-2's Conv1D)",
}
_FACTOR_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")

AdapterT = TypeVar("AdapterT", bound="PeftAdapter")


# --------------------------------------------------------------------------- the config


def _number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {type(value).__name__}")
    return value


def _module_names(value: Any) -> Any:
    """peft accepts a regex (one string) or a list of module names."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ValueError(f"expected a module name regex or a list of module names, got {value!r}")


def _mapping(value: Any) -> Any:
    """peft writes `{}` for no patterns; older files may hold null."""
    return {} if value is None else value


Number = Annotated[int | float, BeforeValidator(_number)]
ModuleNames = Annotated[str | list[str] | None, BeforeValidator(_module_names)]


@cache
def peft_lora_default(name: str) -> Any:
    """peft's own default for a `LoraConfig` field (read, not copied, so it follows peft)."""
    from peft import LoraConfig

    return {f.name: f.default for f in dataclasses.fields(LoraConfig)}[name]


def _peft_default(name: str, **constraints: Any) -> Any:
    """A field defaulting to peft's value, looked up only when a config leaves it out (peft imports slowly)."""
    return Field(default_factory=lambda: peft_lora_default(name), **constraints)


class AdapterConfig(BaseModel):
    """The keys of any peft adapter config that moerge reads, type-checked; other keys are kept as they are."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    peft_type: str
    base_model_name_or_path: str | None = None
    peft_version: str | None = None
    target_modules: ModuleNames = None


class LoraAdapterConfig(AdapterConfig):
    """A LoRA config: ranks, alphas and the features in `UNSUPPORTED`; missing keys take peft's defaults."""

    peft_type: Literal["LORA"]
    r: int = _peft_default("r", gt=0)
    lora_alpha: Number = _peft_default("lora_alpha")
    use_rslora: bool = _peft_default("use_rslora")
    rank_pattern: Annotated[dict[str, Annotated[int, Field(gt=0)]], BeforeValidator(_mapping)] = {}
    alpha_pattern: Annotated[dict[str, Number], BeforeValidator(_mapping)] = {}
    fan_in_fan_out: bool = _peft_default("fan_in_fan_out")
    use_dora: bool = _peft_default("use_dora")
    lora_bias: bool = _peft_default("lora_bias")
    modules_to_save: ModuleNames = None
    trainable_token_indices: Any = None
    target_parameters: Any = None
    alora_invocation_tokens: Any = None
    layer_replication: Any = None

    def rank_of(self, module: str) -> int:
        """peft's rank for `module`: the matching `rank_pattern` entry, else `r`."""
        return _pattern_value(self.rank_pattern, module, self.r)

    def scaling_of(self, module: str) -> float:
        """peft's scaling for `module`: α/r, or α/√r with rsLoRA (α and r pattern-matched)."""
        alpha = _pattern_value(self.alpha_pattern, module, self.lora_alpha)
        rank = self.rank_of(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def features(self) -> list[str]:
        """The `UNSUPPORTED` features this config turns on."""
        return [key for key in UNSUPPORTED if getattr(self, key)]


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    from peft.utils.other import get_pattern_key

    return patterns.get(get_pattern_key(list(patterns), module), default)


def read_adapter_config(folder: Path) -> AdapterConfig:
    """The folder's config, validated (as a `LoraAdapterConfig` when its peft_type is LORA)."""
    path = folder / ADAPTER_CONFIG
    raw = parse_json(path.read_bytes(), path)
    if not isinstance(raw, dict):
        raise MoergeError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    model = LoraAdapterConfig if raw.get("peft_type") == "LORA" else AdapterConfig
    return validate(model, raw, Source(str(path)))


# --------------------------------------------------------------------------- any peft adapter


def _check_files(folder: Path) -> None:
    """The config and safetensors weights exist; pickled weights are refused with how to convert them."""
    if not folder.is_dir():
        raise MoergeError(f"{folder}: adapter folder not found")
    if not (folder / ADAPTER_CONFIG).is_file():
        raise MoergeError(
            f"{folder / ADAPTER_CONFIG}: not found (expected a peft adapter folder saved with save_pretrained)"
        )
    if (folder / ADAPTER_WEIGHTS).is_file():
        return
    pickled = next((name for name in PICKLE_WEIGHTS if (folder / name).is_file()), None)
    if pickled:
        raise MoergeError(
            f"{folder / pickled}: {pickled} is not read (pickle files can run code); load the adapter in peft"
            " and re-save it with save_pretrained(folder, safe_serialization=True)"
        )
    raise MoergeError(f"{folder / ADAPTER_WEIGHTS}: not found (expected peft's safetensors weights)")


def read_tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the safetensors header alone."""
    try:
        with safe_open(str(weights), framework="pt") as fh:
            return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}  # noqa: SIM118
    except SafetensorError as exc:
        raise MoergeError(f"{weights}: not a readable safetensors file ({exc})") from None


def _read_folder(folder: Path, label: str | None) -> dict[str, Any]:
    """Everything `PeftAdapter` holds, checked in order: files present, files intact, config types."""
    _check_files(folder)
    meta = check_expert_intact(folder) if is_expert_folder(folder) else None
    return {
        "folder": folder,
        "label": label or (meta.name if meta else folder.name),
        "config": read_adapter_config(folder),
        "meta": meta,
        "tensor_shapes": read_tensor_shapes(folder / ADAPTER_WEIGHTS),
    }


@dataclass
class PeftAdapter:
    """Any peft adapter folder (LoRA, IA3, ...): validated config, intact files, safetensors header."""

    folder: Path
    label: str
    config: AdapterConfig
    meta: ExpertMeta | None
    tensor_shapes: dict[str, tuple[int, ...]] = field(repr=False)

    @classmethod
    def open(cls: type[AdapterT], folder: str | Path, label: str | None = None) -> AdapterT:
        """`label` names the adapter in messages; default: `moerge.json`'s name, else the folder's."""
        return cls(**_read_folder(Path(folder), label))

    @property
    def config_path(self) -> Path:
        return self.folder / ADAPTER_CONFIG

    @property
    def weights_path(self) -> Path:
        return self.folder / ADAPTER_WEIGHTS

    @property
    def fingerprint(self) -> str:
        """The base model's fingerprint recorded in `moerge.json` ("unknown" without one)."""
        return self.meta.base.fingerprint if self.meta else UNKNOWN

    @property
    def parameter_count(self) -> int:
        """Parameters stored in the weights file (every tensor, from the header)."""
        return sum(math.prod(shape) for shape in self.tensor_shapes.values())


def open_adapter(folder: str | Path, label: str | None = None) -> PeftAdapter:
    """Any peft adapter folder; a `LoraAdapter` when it holds a LoRA."""
    parts = _read_folder(Path(folder), label)
    return (LoraAdapter if isinstance(parts["config"], LoraAdapterConfig) else PeftAdapter)(**parts)


# --------------------------------------------------------------------------- LoRA


@dataclass
class LoraAdapter(PeftAdapter):
    """A LoRA adapter whose factors are read lazily, one module at a time.

    Every LoRA flavour opens (DoRA, rsLoRA, patterns, ...); code that applies Δ = B·A itself calls
    `require_plain` first, so features it would silently drop are refused.
    """

    config: LoraAdapterConfig
    factor_keys: dict[str, tuple[str, str]] = field(init=False, repr=False)
    other_tensors: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.config, LoraAdapterConfig):
            raise MoergeError(f"{self.config_path}: peft_type {self.config.peft_type!r}: not a LoRA adapter")
        self.factor_keys, self.other_tensors = self._index_factors()
        for module in self.factor_keys:
            self._check_rank(module)

    def _index_factors(self) -> tuple[dict[str, tuple[str, str]], list[str]]:
        """(module → (lora_A key, lora_B key)) for 2-D factors, and every other tensor's key."""
        parts: dict[str, dict[str, str]] = {}
        others = []
        for key, shape in self.tensor_shapes.items():
            match = _FACTOR_KEY.match(key)
            if match and len(shape) == 2:
                parts.setdefault(match["module"], {})[match["part"]] = key
            else:
                others.append(key)
        for module, pair in parts.items():
            if set(pair) != {"A", "B"}:
                raise MoergeError(f"{self.weights_path}: {module} lacks lora_{'B' if 'A' in pair else 'A'}")
        return {m: (p["A"], p["B"]) for m, p in sorted(parts.items())}, others

    def _check_rank(self, module: str) -> None:
        key_a, key_b = self.factor_keys[module]
        expected = self.config.rank_of(module)
        ranks = (self.tensor_shapes[key_a][0], self.tensor_shapes[key_b][1])
        if ranks != (expected, expected):
            raise MoergeError(
                f"{self.weights_path}: {module}: lora_A/lora_B have ranks {ranks[0]}/{ranks[1]},"
                f" but {ADAPTER_CONFIG} gives rank {expected} (r / rank_pattern)"
            )

    def require_plain(self, purpose: str, *, allow: Collection[str] = ()) -> LoraAdapter:
        """Refuse every `UNSUPPORTED` feature not in `allow`, and any tensor that is not a factor of a
        linear layer (embedding or convolution LoRA): `purpose` (e.g. "merging") applies B·A only."""
        for key in self.config.features():
            if key not in allow:
                raise MoergeError(
                    f"{self.config_path}: {key} is set ({UNSUPPORTED[key]}); {purpose} supports plain LoRA updates only"
                )
        if self.other_tensors:
            raise MoergeError(
                f"{self.weights_path}: tensor {self.other_tensors[0]!r} is not a LoRA factor of a linear layer;"
                f" {purpose} supports plain LoRA updates only"
            )
        return self

    @property
    def modules(self) -> list[str]:
        """The adapted modules (names as in the base model), sorted."""
        return list(self.factor_keys)

    def rank(self, module: str) -> int:
        return self.tensor_shapes[self.factor_keys[module][0]][0]

    def shape(self, module: str) -> tuple[int, int]:
        """(out, in) of Δ for `module`, from the factors' shapes."""
        key_a, key_b = self.factor_keys[module]
        return self.tensor_shapes[key_b][0], self.tensor_shapes[key_a][1]

    def scaling(self, module: str) -> float:
        return self.config.scaling_of(module)

    @cached_property
    def _reader(self) -> Any:
        return safe_open(str(self.weights_path), framework="pt")

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(s·A, B) in float32, so Δ = B @ A with the scaling folded into A; None when `module` is not adapted."""
        if module not in self.factor_keys:
            return None
        key_a, key_b = self.factor_keys[module]
        a = self._reader.get_tensor(key_a).float()
        b = self._reader.get_tensor(key_b).float()
        return a * self.scaling(module), b

    def check_against(self, model: nn.Module) -> dict[str, str]:
        """Map each adapted module to the `model` module it updates; refuse modules the model lacks, or whose
        layer is not an nn.Linear of Δ's (out, in) shape ((in, out) weights with fan_in_fan_out)."""
        names = dict(model.named_modules())
        found = {}
        for module in self.modules:
            name = _model_name(names, module)
            if name is None:
                raise MoergeError(
                    f"{self.folder}: module {module}: not in the base model (was the adapter trained on another base?)"
                )
            actual = _layer_shape(names[name], self.config.fan_in_fan_out)
            if actual != self.shape(module):
                raise MoergeError(
                    f"{self.folder}: module {module}: the adapter's update is {self.shape(module)} (out, in),"
                    f" the base model's layer is {actual or type(names[name]).__name__} (another base?)"
                )
            found[module] = name
        return found


def _model_name(names: Collection[str], module: str) -> str | None:
    """The model's name for an adapter module: the adapter or the model may be the bare decoder, whose
    module names lack the causal LM's `model.` prefix."""
    return next((c for c in (module, module.removeprefix("model."), f"model.{module}") if c in names), None)


def _layer_shape(layer: nn.Module, fan_in_fan_out: bool) -> tuple[int, int] | None:
    """(out, in) of a linear layer (a transposed 2-D weight with fan_in_fan_out); None for any other layer."""
    from torch import nn

    if fan_in_fan_out:
        weight = getattr(layer, "weight", None)
        return tuple(reversed(weight.shape)) if weight is not None and weight.dim() == 2 else None  # type: ignore[return-value]
    return (layer.out_features, layer.in_features) if isinstance(layer, nn.Linear) else None


# --------------------------------------------------------------------------- several experts


def check_same_base(adapters: Sequence[PeftAdapter]) -> None:
    """Refuse experts whose `moerge.json` names different base fingerprints (unknown ones are not compared)."""
    known = {a.label: a.fingerprint for a in adapters if a.fingerprint != UNKNOWN}
    if len(set(known.values())) > 1:
        listing = ", ".join(f"{label}={fp[:12]}" for label, fp in known.items())
        raise MoergeError(f"experts: trained on different base models (base.fingerprint: {listing})")


def check_same_shapes(adapters: Sequence[LoraAdapter]) -> None:
    """Experts adapting the same module with different layer shapes cannot share a base."""
    seen: dict[str, tuple[tuple[int, int], str]] = {}
    for adapter in adapters:
        for module in adapter.modules:
            shape = adapter.shape(module)
            first = seen.setdefault(module, (shape, adapter.label))
            if first[0] != shape:
                raise MoergeError(
                    f"experts: {module} is {first[0]} in {first[1]} but {shape} in {adapter.label}"
                    " (different base models)"
                )
