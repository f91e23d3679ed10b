"""The registry of task sources: how a spec (`prefix:...`, a file suffix, a folder) becomes examples.

A new source is one function plus `@task_source(...)` in its own module; `moerge.data.loaders`
imports the built-in ones and applies the shared rules (limit, splits) once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from moerge.data.task import Example, Scorer, exact_match
from moerge.registry import Registry

SPLITS = ("train", "validation", "test")


@dataclass
class RawTask:
    """What a source yields: examples, or `presplit` examples when the data names its own splits."""

    name: str
    examples: list[Example] = field(default_factory=list)
    presplit: dict[str, list[Example]] | None = None
    scorer: Scorer = exact_match
    description: str = ""


Loader = Callable[[str], RawTask]


@dataclass(frozen=True)
class TaskSource:
    """How a spec is recognised (`prefix:`, file suffix or folder) and loaded."""

    name: str
    usage: str
    load: Loader
    prefix: str | None = None
    suffixes: tuple[str, ...] = ()
    folder: bool = False


SOURCES: Registry[TaskSource] = Registry("task source")


def task_source(
    name: str, *, usage: str, prefix: str | None = None, suffixes: tuple[str, ...] = (), folder: bool = False
) -> Callable[[Loader], Loader]:
    """Register a loader; `usage` is what error messages show users as the accepted form."""

    def register(fn: Loader) -> Loader:
        SOURCES.register(name, TaskSource(name, usage, fn, prefix, suffixes, folder))
        return fn

    return register
