"""What to merge, from a YAML file (mergekit-like) and/or command-line flags.

```yaml
method: ties
library: ~/experts            # optional: experts are then library names
experts:
  - {name: arithmetic, weight: 1.0}
  - {path: ./runs/sorting, weight: 0.5}
parameters: {density: 0.2, majority_sign: total}   # the method's own options (see methods.py)
output: {kind: adapter, rank: 16, out: merged-ties}
```
Errors name the file and line of the offending entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moerge.errors import MoergeError
from moerge.merge.methods import MERGE_METHODS, MergeMethod, MergeOptions
from moerge.yamlconf import Source, read_yaml, validate


class ExpertRef(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str | None = None
    path: str | None = None
    weight: float = 1.0

    @model_validator(mode="after")
    def _one_reference(self) -> ExpertRef:
        if (self.name is None) == (self.path is None):
            raise ValueError("give exactly one of 'name' (a library expert) or 'path' (a folder)")
        return self

    @property
    def label(self) -> str:
        return self.name or Path(self.path or "").name

    def folder(self, library: str | None) -> Path:
        """The expert folder: a verified library entry for a name, else the given path."""
        if self.path is not None:
            return Path(self.path).expanduser()
        if library is None:
            raise MoergeError(f"experts: {self.name!r} is a library name but no library is given (--library)")
        from moerge.library import ExpertLibrary

        return Path(ExpertLibrary(library).path(self.name))


class OutputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["adapter", "full"] = "adapter"
    rank: int | None = Field(default=None, gt=0)
    out: str
    base: str | None = None
    overwrite: bool = False
    max_shard_mb: int = Field(default=2048, gt=0)

    @model_validator(mode="after")
    def _full_needs_base(self) -> OutputSpec:
        if self.kind == "full" and self.base is None:
            raise ValueError("kind 'full' needs 'base' (the base model folder, --base)")
        return self


class MergeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    library: str | None = None
    experts: list[ExpertRef] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    output: OutputSpec

    @model_validator(mode="after")
    def _distinct_experts(self) -> MergeSpec:
        labels = [e.label for e in self.experts]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"listed more than once: {', '.join(repeated)}")
        return self

    def folders(self) -> dict[str, Path]:
        return {e.label: e.folder(self.library) for e in self.experts}

    @property
    def weights(self) -> list[float]:
        return [e.weight for e in self.experts]

    def method_and_options(self, source: Source | None = None) -> tuple[MergeMethod, MergeOptions]:
        """The merge method and `parameters` as its typed options; errors point into `source` (the
        spec's file), so a parameter the method does not take is named with its line."""
        source = source or Source("merge")
        try:
            method = MERGE_METHODS.get(self.method)
        except MoergeError as exc:
            raise source.error(["method"], str(exc)) from None
        return method, method.parse_options(self.parameters, source.at("parameters"))


def apply_overrides(raw: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """Merge command-line flags over a config dict (flags left as None change nothing).

    `experts` is a list of references (library names with `library`, else paths); `weights` a
    list of floats for the experts, in order; other keys go to `parameters` or `output`.
    """
    raw = {**raw, "parameters": dict(raw.get("parameters") or {}), "output": dict(raw.get("output") or {})}
    for key in ("method", "library"):
        if flags.get(key) is not None:
            raw[key] = flags[key]
    if flags.get("experts") is not None:
        key = "name" if raw.get("library") else "path"
        raw["experts"] = [{key: ref} for ref in flags["experts"]]
    if flags.get("weights") is not None:
        experts = raw.get("experts") or []
        if len(flags["weights"]) != len(experts):
            raise MoergeError(f"--weights: {len(flags['weights'])} weights for {len(experts)} experts")
        raw["experts"] = [{**e, "weight": w} for e, w in zip(experts, flags["weights"], strict=True)]
    for key, value in (flags.get("parameters") or {}).items():
        if value is not None:
            raw["parameters"][key] = value
    for key, value in (flags.get("output") or {}).items():
        if value is not None:
            raw["output"][key] = value
    return raw


def load_merge_spec(config: Path | None, flags: dict[str, Any]) -> MergeSpec:
    """Read the YAML config (if any), apply flags, validate (the method's options too); errors point
    at file and line."""
    raw: dict[str, Any] = {}
    source = Source("options")
    if config is not None:
        raw, source = read_yaml(config, "merge config")
    spec = validate(MergeSpec, apply_overrides(raw, flags), source)
    spec.method_and_options(source)  # an unknown method or option is refused here, at its line
    return spec
