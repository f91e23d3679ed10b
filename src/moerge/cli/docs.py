"""`make docs` (`python -m moerge.cli.docs README.md`): the README's option tables, generated from the
registries' options models, so the documented options are exactly the accepted ones.

A table lives between `<!-- options:KIND -->` and `<!-- /options:KIND -->` (KIND: train, merge, route,
strategy, prompt_format); `--check` exits 1 when a table is stale instead of rewriting the file.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from pydantic import BaseModel

from moerge.cli.help import option_lines
from moerge.paths import write_text_atomic
from moerge.tables import Column, Table, cell

Entries = Iterable[tuple[str, type[BaseModel]]]


def _train() -> Entries:
    from moerge.train.methods import METHODS

    return ((name, method.options) for name, method in METHODS.items())


def _merge() -> Entries:
    from moerge.merge.methods import MERGE_METHODS

    return ((name, method.options) for name, method in MERGE_METHODS.items())


def _route() -> Entries:
    from moerge.route import ROUTERS

    return ((name, router.options_model) for name, router in ROUTERS.items())


def _strategy() -> Entries:
    from moerge.recipes.strategies import STRATEGIES

    return ((name, kind.options) for name, kind in STRATEGIES.items())


def _prompt_format() -> Entries:
    from moerge.data.formats import PromptFormat

    return [("a format's fields", PromptFormat)]


KINDS: dict[str, tuple[str, Callable[[], Entries]]] = {
    "train": ("training method", _train),
    "merge": ("merge method", _merge),
    "route": ("router", _route),
    "strategy": ("strategy kind", _strategy),
    "prompt_format": ("prompt format", _prompt_format),
}


def options_markdown(kind: str) -> str:
    """The Markdown table of one registry: each name with its options, their defaults and meanings."""
    label, entries = KINDS[kind]
    columns = [Column("name", label), Column("options", "options (default): meaning")]
    rows = [[cell(f"`{name}`"), cell("\n".join(option_lines(model)))] for name, model in entries()]
    return Table("", columns, rows).to_markdown()


def update(text: str) -> str:
    """`text` with every marked table regenerated."""
    for kind in KINDS:
        pattern = re.compile(rf"(<!-- options:{kind} -->\n)(?:.*?\n)?(<!-- /options:{kind} -->)", re.S)
        text = pattern.sub(lambda m, k=kind: m.group(1) + options_markdown(k) + "\n" + m.group(2), text)
    return text


def main(argv: list[str]) -> int:
    check = "--check" in argv
    path = Path(next((a for a in argv if not a.startswith("--")), "README.md"))
    text = path.read_text(encoding="utf-8")
    fresh = update(text)
    if fresh == text:
        return 0
    if check:
        print(f"{path}: option tables are stale; run `make docs`", file=sys.stderr)
        return 1
    write_text_atomic(path, fresh)
    print(f"{path}: option tables regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
