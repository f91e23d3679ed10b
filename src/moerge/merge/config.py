"""What to merge, from a YAML file (mergekit-like) and/or command-line flags.

```yaml
method: ties
library: ~/experts            # optional: experts are then library names
experts:
  - {name: arithmetic, weight: 1.0}
  - {path: ./runs/sorting, weight: 0.5}
parameters: {density: 0.2, majority_sign: total, seed: 0}
output: {kind: adapter, rank: 16, out: merged-ties}
```
Errors name the file and line of the offending entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moerge.errors import MoergeError


class ExpertRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
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
    """Read the YAML config (if any), apply flags, validate; errors point at file and line."""
    raw: dict[str, Any] = {}
    root = None
    if config is not None:
        raw, root = _read_yaml(Path(config))
    raw = apply_overrides(raw, flags)
    try:
        return MergeSpec.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = list(err["loc"])
        where = _line_of(root, loc)
        prefix = f"{config}:{where}: " if where else (f"{config}: " if config else "")
        field = ".".join(str(p) for p in loc) or "config"
        raise MoergeError(f"{prefix}{field}: {err['msg']}") from None


def _read_yaml(path: Path) -> tuple[dict[str, Any], yaml.Node | None]:
    if not path.is_file():
        raise MoergeError(f"{path}: merge config not found")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise MoergeError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise MoergeError(f"{path}: expected a mapping with method, experts, parameters, output")
    return raw, root


def _line_of(node: yaml.Node | None, loc: list[Any]) -> int | None:
    """1-based line of the deepest YAML node on the path `loc` (pydantic's error location)."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
        if node is None:
            break
        line = node.start_mark.line + 1
    return line
