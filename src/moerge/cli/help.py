"""Help texts generated from the options models, so `--help`, errors and the README never disagree."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import click
from pydantic import BaseModel
from typer.core import TyperCommand

from moerge.errors import MoergeError
from moerge.yamlconf import Source

PROMPT_FORMAT_HELP = "prompt format: moerge, plain, raw, or a YAML file of fields (see README, Prompt formats)"


def prompt_format_option(value: str | None) -> Any:
    """`--prompt-format`'s value as a format (None when not given); a bad one is one line."""
    from moerge.data.formats import load_prompt_format

    return None if value is None else load_prompt_format(value, field="--prompt-format")


def default_text(model: type[BaseModel], name: str) -> str | None:
    """The field's default as a user would type it, or None when it is required or empty."""
    info = model.model_fields[name]
    if info.is_required():
        return None
    default = info.get_default(call_default_factory=True)
    if default is None or default == [] or default == {}:
        return None
    if isinstance(default, str) and (default != default.strip() or "\n" in default):
        return json.dumps(default)  # spaces and line breaks shown as a user would write them in YAML
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


def option_lines(model: type[BaseModel]) -> list[str]:
    """One line per option: `name` (default d): description — for the README's generated tables."""
    lines = []
    for name, info in model.model_fields.items():
        default = default_text(model, name)
        shown = f"`{name}` (default {default})" if default is not None else f"`{name}`"
        lines.append(f"{shown}: {info.description or ''}".rstrip(": "))
    return lines or ["no options"]


def lazy_epilog(make: Callable[[], str]) -> type[TyperCommand]:
    """A command class whose `--help` ends with `make()`, computed only when help is shown: the
    registries behind it import torch, which would slow every command if done at start-up."""

    class LazyEpilogCommand(TyperCommand):
        def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
            self.epilog = make()
            super().format_help(ctx, formatter)

    return LazyEpilogCommand


def key_values(values: list[str] | None, flag: str) -> dict[str, str]:
    """`key=value` pairs of a repeatable flag, as text."""
    out = {}
    for value in values or []:
        key, sep, rest = value.partition("=")
        if not sep or not key.strip():
            raise MoergeError(f"{flag}: expected key=value, got {value!r}")
        out[key.strip()] = rest.strip()
    return out


def option_values(values: list[str] | None, flag: str = "--option") -> dict[str, Any]:
    """`--option key=value` pairs. A value starting with { or [ is JSON (a mapping or a list); any
    other value stays text, for the options model to coerce (steps=3, lr=1e-3) or refuse by name."""
    out: dict[str, Any] = {}
    for key, text in key_values(values, flag).items():
        if not text.startswith(("{", "[")):
            out[key] = text
            continue
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise Source(flag).error([key], f"not valid JSON ({exc.msg})") from None
    return out
