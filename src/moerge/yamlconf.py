"""Reading configs (YAML files, command-line options) into pydantic models, with errors that say
`file:line: field: message` for every config the product reads (train, library, merge, route, compare)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ValidationError

from moerge.errors import MoergeError

M = TypeVar("M", bound=BaseModel)


def _split_commas(value: Any) -> Any:
    return [t.strip() for t in value.split(",") if t.strip()] if isinstance(value, str) else value


CommaList = Annotated[list[str], BeforeValidator(_split_commas)]
"""A list of names that a command line may give as one comma-separated string (`q_proj,v_proj`)."""


@dataclass(frozen=True)
class Source:
    """Where a config's values came from: a file (with its YAML node tree, for line numbers) or a
    description such as "command-line options"; `prefix` locates a nested mapping inside the file
    (e.g. `("stages", 2)`), so errors about it still name the field's full path and line."""

    name: str
    root: yaml.Node | None = None
    prefix: tuple[Any, ...] = ()

    def at(self, *loc: Any) -> Source:
        """The same file, one mapping further down."""
        return Source(self.name, self.root, (*self.prefix, *loc))

    def error(self, loc: tuple[Any, ...] | list[Any], message: str) -> MoergeError:
        """One line: `file:line: field.path: message` (the line when the file has the field)."""
        full = [*self.prefix, *loc]
        line = line_of(self.root, full)
        where = f"{self.name}:{line}" if line else self.name
        field = ".".join(str(p) for p in full)
        return MoergeError(f"{where}: {field}: {message}" if field else f"{where}: {message}")


def read_yaml(path: Path | str, what: str) -> tuple[dict[str, Any], Source]:
    """The file's top-level mapping and a `Source` that can point at its lines."""
    path = Path(path)
    if not path.is_file():
        raise MoergeError(f"{path}: not found (expected a {what} file)")
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except UnicodeDecodeError:
        raise MoergeError(f"{path}: not UTF-8 text (expected a YAML {what})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise MoergeError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise MoergeError(f"{path}: expected a mapping of {what} settings, got {type(raw).__name__}")
    return raw, Source(str(path), root)


def validate(model: type[M], raw: Any, source: Source | str) -> M:
    """`model` built from `raw`; the first problem becomes one `file:line: field: message` error."""
    source = Source(source) if isinstance(source, str) else source
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise first_error(source, exc) from None


def validate_options(model: type[M], raw: Any, source: Source | str, what: str) -> M:
    """The options of one method, router or strategy (`what`, e.g. "merge method 'ties'"): a key the
    model does not have is refused with the list of the options `what` does take. `source` points at
    the options' own mapping (e.g. `Source(file, root, ("parameters",))`)."""
    source = Source(source) if isinstance(source, str) else source
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise source.error([], f"expected a mapping of {what} options, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(model.model_fields), key=str)
    if unknown:
        raise source.error([unknown[0]], f"not {an_option_of(what, model)}")
    return validate(model, raw, source)


def an_option_of(what: str, model: type[BaseModel]) -> str:
    """`an option of <what> (its options: a, b)`: how every refusal of an unknown option ends."""
    return f"an option of {what} (its options: {', '.join(model.model_fields) or 'none'})"


def load_config(path: Path | str, model: type[M], what: str) -> M:
    """Read a YAML file into `model` (see `validate`)."""
    raw, source = read_yaml(path, what)
    return validate(model, raw, source)


def first_error(source: Source, exc: ValidationError) -> MoergeError:
    """pydantic's first error as one line (a `ValueError` raised by a validator keeps its own text).
    An unknown key goes first: a misspelt setting usually also makes a required one "missing"."""
    errors = exc.errors()
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    message = str(err["ctx"]["error"]) if err["type"] == "value_error" and "ctx" in err else err["msg"]
    return source.error(list(err["loc"]), message)


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
