"""Reading YAML configs (recipes, merge configs) with errors that point at the file, line and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from moerge.errors import MoergeError


def read_yaml_mapping(path: Path, what: str) -> tuple[dict[str, Any], yaml.Node | None]:
    """The file's top-level mapping and its YAML node tree (for line numbers of later errors)."""
    path = Path(path)
    if not path.is_file():
        raise MoergeError(f"{path}: {what} not found")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise MoergeError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise MoergeError(f"{path}: expected a mapping of {what} settings, got {type(raw).__name__}")
    return raw, root


def line_of(node: yaml.Node | None, loc: list[Any]) -> int | None:
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


def validation_error(source: Path | str | None, root: yaml.Node | None, exc: ValidationError) -> MoergeError:
    """The first pydantic error as one line: `file:line: field: message`."""
    err = exc.errors()[0]
    loc = list(err["loc"])
    where = line_of(root, loc)
    prefix = f"{source}:{where}: " if source and where else (f"{source}: " if source else "")
    field = ".".join(str(p) for p in loc) or "config"
    return MoergeError(f"{prefix}{field}: {err['msg']}")
