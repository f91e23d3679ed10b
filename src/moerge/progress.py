"""Consoles: one look for every long-running loop (a rich progress bar on stderr), and readable tables."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

OFF_TERMINAL_WIDTH = 240


def progress_bar(*, enabled: bool = True) -> Progress:
    return Progress(
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}", markup=False),
        console=output_console(stderr=True),
        disable=not enabled,
        transient=False,
    )


def output_console(*, stderr: bool = False) -> Console:
    """Console for what commands print. Markup is off: the text holds user names and paths (a task
    called `a[/]b` is printed as is, never read as a style tag); styles go in as `Text` spans.
    Rich wraps to 80 columns when the stream is not a terminal (a log file, `| tee`), which truncates
    the numbers of wide tables; use a wide fixed width there instead."""
    plain = {"stderr": stderr, "markup": False, "highlight": False, "emoji": False, "soft_wrap": stderr}
    console = Console(**plain)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        return Console(width=OFF_TERMINAL_WIDTH, **plain)
    return console


def styled(*parts: str | tuple[str, str]) -> Text:
    """One printed line from plain strings and (text, style) pairs, so styles never parse user text."""
    return Text.assemble(*parts)
