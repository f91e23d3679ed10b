"""The one reader of peft adapter folders: merging, routing, importing and loading all open experts here.

Only JSON and safetensors are read (pickled `adapter_model.bin` is refused, never unpickled). At open
time the folder's files are checked against `moerge.json` (when there is one), the config's types are
validated (one `<folder>/adapter_config.json: field: message` line), and the safetensors header is
indexed without loading a tensor.

A LoRA's update of module m is Δ = s·B·A with peft's own scaling s = α/r (α/√r with rsLoRA), r and α
taken from `rank_pattern`/`alpha_pattern` when a pattern matches (peft's `get_pattern_key`), else from
`r`/`lora_alpha`, whose defaults are peft's `LoraConfig` defaults. `LoraAdapter.factors` folds s into A.
Numbers must be finite (a NaN α is refused at open), and every tensor read is checked with
`check_finite` (a NaN/inf factor is refused, never merged or routed).

Provenance: `check_same_base` is the one base-fingerprint check of everything that combines experts or
puts one on a base (loading, merging, routing, comparing): the experts' recorded fingerprints must
agree with each other and, when the base is known, with the base's.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from moerge.data.formats import UNKNOWN as UNKNOWN_FORMAT
from moerge.data.formats import Recorded as RecordedFormat
from moerge.errors import MoergeError
from moerge.library.expert import (
    METADATA_FILE,
    ExpertMeta,
    check_expert_intact,
    is_expert_folder,
    recorded_format,
)
from moerge.models.loading import SafetensorsFile, check_finite, open_safetensors, safetensors_shapes
from moerge.models.sources import pickle_refusal
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
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value}")
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


def check_adapter_files(folder: Path) -> None:
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
        raise pickle_refusal(
            folder / pickled,
            "peft: PeftModel.from_pretrained(model, folder).save_pretrained(folder, safe_serialization=True)",
        )
    raise MoergeError(f"{folder / ADAPTER_WEIGHTS}: not found (expected peft's safetensors weights)")


def read_tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the safetensors header alone."""
    return safetensors_shapes(weights)


def _read_folder(folder: Path, label: str | None) -> dict[str, Any]:
    """Everything `PeftAdapter` holds, checked in order: files present, files intact, config types."""
    check_adapter_files(folder)
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
    def prompt_format(self) -> RecordedFormat:
        """The prompt format it was trained with (`unknown` for a plain peft folder)."""
        return recorded_format(self.meta) if self.meta else UNKNOWN_FORMAT

    @property
    def parameter_count(self) -> int:
        """Parameters stored in the weights file (every tensor, from the header)."""
        return sum(math.prod(shape) for shape in self.tensor_shapes.values())

    def check_values(self) -> PeftAdapter:
        """Read every tensor once and refuse NaN/inf values (`check_finite`), for users that hand the
        file to peft instead of reading factors here (loading, importing)."""
        with open_safetensors(self.weights_path) as fh:
            for key in fh:
                check_finite({key: fh.get_tensor(key)}, self.weights_path)
        return self


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
        return SafetensorsFile.open(self.weights_path)

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(s·A, B) in float32, so Δ = B @ A with the scaling folded into A; None when `module` is not adapted.
        A factor holding NaN/inf is refused (`check_finite`)."""
        if module not in self.factor_keys:
            return None
        key_a, key_b = self.factor_keys[module]
        a = self._reader.get_tensor(key_a).float()
        b = self._reader.get_tensor(key_b).float()
        check_finite({key_a: a, key_b: b}, self.weights_path)
        return a * self.scaling(module), b

    def check_against(self, model: nn.Module) -> dict[str, str]:
        """Map each adapted module to the `model` module it updates; refuse modules the model lacks, or whose
        layer is not an nn.Linear of Δ's (out, in) shape ((in, out) weights with fan_in_fan_out)."""
        layers = {name: _layer_shape(layer, self.config.fan_in_fan_out) for name, layer in model.named_modules()}
        return self.check_layers(layers)

    def check_layers(self, layers: Mapping[str, tuple[int, ...] | str], base: str = "the base model") -> dict[str, str]:
        """`check_against` for a base known by its layers: name → (out, in) of its linear layers (a name
        describing any other layer); `models.loading.base_layer_shapes` gives them from a base's files."""
        found = {}
        for module in self.modules:
            name = _model_name(layers, module)
            if name is None:
                raise MoergeError(
                    f"{self.folder}: module {module}: not in {base} (was the adapter trained on another base?)"
                )
            actual = layers[name]
            if actual != self.shape(module):
                raise MoergeError(
                    f"{self.folder}: module {module}: the adapter's update is {self.shape(module)} (out, in),"
                    f" {base}'s layer is {actual} (another base?)"
                )
            found[module] = name
        return found


def _model_name(names: Collection[str], module: str) -> str | None:
    """The model's name for an adapter module: the adapter or the model may be the bare decoder, whose
    module names lack the causal LM's `model.` prefix."""
    return next((c for c in (module, module.removeprefix("model."), f"model.{module}") if c in names), None)


def _layer_shape(layer: nn.Module, fan_in_fan_out: bool) -> tuple[int, ...] | str:
    """(out, in) of a linear layer (a transposed 2-D weight with fan_in_fan_out); the type name of any other."""
    from torch import nn

    if fan_in_fan_out:
        weight = getattr(layer, "weight", None)
        if weight is not None and weight.dim() == 2:
            return tuple(reversed(weight.shape))
    elif isinstance(layer, nn.Linear):
        return (layer.out_features, layer.in_features)
    return type(layer).__name__


# --------------------------------------------------------------------------- several experts


class Recorded(Protocol):
    """What `check_same_base` reads of an expert: a `PeftAdapter`, or a `RecordedBase` for other kinds."""

    @property
    def label(self) -> str: ...

    @property
    def folder(self) -> Path: ...

    @property
    def fingerprint(self) -> str: ...


@dataclass(frozen=True)
class RecordedBase:
    """An expert's recorded base without opening it as an adapter (full-weight experts)."""

    label: str
    folder: Path
    fingerprint: str


def short_fingerprint(fingerprint: str) -> str:
    """`sha256:` and the first 12 hex digits: enough to tell bases apart in a message."""
    kind, _, digest = fingerprint.partition(":")
    return f"{kind}:{digest[:12]}" if digest else fingerprint[:19]


def check_same_base(experts: Sequence[Recorded], base: str | None = None, *, base_name: str = "the base model") -> None:
    """The one provenance check: refuse experts whose `moerge.json` names different base fingerprints,
    and, given the fingerprint `base` of the base they are put on (`base_name` names it in the message),
    any expert trained on another base. Experts without a recorded fingerprint are not compared."""
    known = [e for e in experts if e.fingerprint != UNKNOWN]
    odd = next((e for e in known if e.fingerprint != known[0].fingerprint), None)
    if odd is not None:
        listing = ", ".join(f"{e.label}={short_fingerprint(e.fingerprint)}" for e in known)
        raise MoergeError(
            f"{odd.folder / METADATA_FILE}: base.fingerprint: experts trained on different base models ({listing})"
        )
    if base is None or base == UNKNOWN:
        return
    for expert in known:
        if expert.fingerprint != base:
            raise MoergeError(
                f"{expert.folder / METADATA_FILE}: base.fingerprint: expert {expert.label} was trained on base"
                f" {short_fingerprint(expert.fingerprint)}, but {base_name} has fingerprint {short_fingerprint(base)}"
            )


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
