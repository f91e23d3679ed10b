"""Consoles: one look for every long-running loop (a rich progress bar on stderr), and readable tables."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_stderr = Console(stderr=True)
OFF_TERMINAL_WIDTH = 240


def progress_bar(*, enabled: bool = True) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=_stderr,
        disable=not enabled,
        transient=False,
    )


def output_console() -> Console:
    """Console for tables on stdout. Rich wraps to 80 columns when stdout is not a terminal (a log
    file, `| tee`), which truncates the numbers of wide tables; use a wide fixed width there instead."""
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        return Console(width=OFF_TERMINAL_WIDTH)
    return console
