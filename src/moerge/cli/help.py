"""Help texts generated from the options models, so `--help`, errors and the README never disagree."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel


def default_text(model: type[BaseModel], name: str) -> str | None:
    """The field's default as a user would type it, or None when it is required or empty."""
    info = model.model_fields[name]
    if info.is_required():
        return None
    default = info.get_default(call_default_factory=True)
    if default is None or default == [] or default == {}:
        return None
    return ",".join(map(str, default)) if isinstance(default, list) else str(default)


def field_help(model: type[BaseModel], name: str) -> str:
    """`description (default X)` for one field."""
    text = model.model_fields[name].description or name
    default = default_text(model, name)
    return f"{text} (default {default})" if default is not None else text


def options_line(model: type[BaseModel]) -> str:
    """`rank=8, alpha=16.0, ...`: a model's options with their defaults, on one line."""
    parts = []
    for name in model.model_fields:
        default = default_text(model, name)
        parts.append(f"{name}={default}" if default is not None else name)
    return ", ".join(parts) or "no options"


def registry_epilog(title: str, entries: Iterable[tuple[str, type[BaseModel]]]) -> str:
    """A help section listing each registered name with its options (one paragraph per name)."""
    lines = [f"{title}:"]
    lines += [f"{name}: {options_line(options)}" for name, options in entries]
    return "\n\n".join(lines)


def options_table(entries: Iterable[tuple[str, type[BaseModel]]]) -> list[dict[str, Any]]:
    """Rows (name, option, default, description) for the README's generated tables."""
    rows = []
    for name, model in entries:
        for option in model.model_fields or {"—": None}:
            if option == "—":
                rows.append({"name": name, "option": "—", "default": "", "description": "no options"})
                continue
            default = default_text(model, option) or ""
            description = model.model_fields[option].description or ""
            rows.append({"name": name, "option": option, "default": default, "description": description})
    return rows
