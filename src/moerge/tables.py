"""One table value, four renderings: a table is built once and shown as rich, Markdown, HTML or CSV.

Building a table once and rendering it keeps headers and cell texts identical in the terminal, the
reports and the CSV, instead of each output listing its own columns. A cell keeps its raw value (what
the CSV gets, so numbers stay numbers) next to the text people see (already formatted by the caller).
"""

from __future__ import annotations

import csv
import html
import io
import re
from dataclasses import dataclass
from typing import Literal

from rich.table import Table as RichTable
from rich.text import Text

Align = Literal["left", "center", "right"]


@dataclass(frozen=True)
class Interval:
    """A score with its confidence interval; the CSV gives it three columns so each stays a number."""

    mean: float
    low: float
    high: float


Value = str | int | float | bool | Interval | None


@dataclass(frozen=True)
class Column:
    """`key` is the stable machine name (the CSV header); `header` is the label people read.

    `interval`: the column's values are Intervals (or None), written to CSV as key, key_ci_low,
    key_ci_high. `shown=False`: data only, in the CSV but not in the tables people read.
    """

    key: str
    header: str
    align: Align = "left"
    interval: bool = False
    shown: bool = True


@dataclass(frozen=True)
class Cell:
    """`value` for machines (CSV), `text` for people (rich, Markdown, HTML)."""

    value: Value
    text: str


def cell(value: Value) -> Cell:
    """A cell whose text is just its value (empty for None), for values that need no formatting."""
    return Cell(value, "" if value is None else str(value))


@dataclass(frozen=True)
class Table:
    """Immutable: lists given for `columns` or `rows` are stored as tuples; every row has one cell per column."""

    title: str
    columns: tuple[Column, ...]
    rows: tuple[tuple[Cell, ...], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "columns", tuple(self.columns))
        object.__setattr__(self, "rows", tuple(tuple(row) for row in self.rows))
        for row in self.rows:
            if len(row) != len(self.columns):
                raise ValueError(f"{self.title}: a row has {len(row)} cells for {len(self.columns)} columns")
            for column, c in zip(self.columns, row, strict=True):
                if isinstance(c.value, Interval) != column.interval and c.value is not None:
                    raise ValueError(f"{self.title}: {column.key}: {c.value!r} does not fit the column")

    def _shown(self) -> tuple[list[Column], list[list[str]]]:
        """Headers and cell texts of the columns people read."""
        keep = [i for i, column in enumerate(self.columns) if column.shown]
        return [self.columns[i] for i in keep], [[row[i].text for i in keep] for row in self.rows]

    def to_rich(self) -> RichTable:
        """Every string goes in as Text, so `[...]` in a task name is shown, never parsed as markup."""
        columns, texts = self._shown()
        table = RichTable(title=Text(self.title) if self.title else None)
        for column in columns:
            table.add_column(Text(column.header), justify=column.align)
        for row in texts:
            table.add_row(*map(Text, row))
        return table

    def to_markdown(self) -> str:
        """A GitHub-flavoured table without the title (Markdown tables have no caption)."""
        columns, texts = self._shown()
        rule = {"left": "---|", "center": ":---:|", "right": "---:|"}
        lines = [_markdown_row([c.header for c in columns]), "|" + "".join(rule[c.align] for c in columns)]
        return "\n".join(lines + [_markdown_row(row) for row in texts])

    def to_html(self, table_id: str) -> str:
        """A <table id=...> with the title as caption; alignment inline, so it needs no stylesheet."""
        columns, texts = self._shown()
        head = _html_row("th", columns, [c.header for c in columns])
        body = "".join(_html_row("td", columns, row) for row in texts)
        caption = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return f'<table id="{html.escape(table_id)}">{caption}<thead>{head}</thead><tbody>{body}</tbody></table>'

    def to_csv(self) -> str:
        """Every column, shown or not, headed by its key; raw values, so numbers keep full precision.

        None is an empty field; an interval column is three fields: key, key_ci_low, key_ci_high.
        """
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow([name for column in self.columns for name in _csv_names(column)])
        for row in self.rows:
            writer.writerow([v for column, c in zip(self.columns, row, strict=True) for v in _csv_values(column, c)])
        return buffer.getvalue()


def _markdown_row(texts: list[str]) -> str:
    """Backslashes, then pipes, are escaped so a cell cannot end early; newlines would end the row."""
    escaped = (re.sub(r"\r\n|\r|\n", "<br>", t.replace("\\", "\\\\").replace("|", "\\|")) for t in texts)
    return "| " + " | ".join(escaped) + " |"


def _html_row(tag: str, columns: list[Column], texts: list[str]) -> str:
    cells = (
        f'<{tag} style="text-align:{c.align}">{html.escape(t)}</{tag}>' for c, t in zip(columns, texts, strict=True)
    )
    return f"<tr>{''.join(cells)}</tr>"


def _csv_names(column: Column) -> list[str]:
    return [column.key, f"{column.key}_ci_low", f"{column.key}_ci_high"] if column.interval else [column.key]


def _csv_values(column: Column, c: Cell) -> list[Value]:
    if not column.interval:
        return [c.value]
    if c.value is None:
        return [None, None, None]
    assert isinstance(c.value, Interval)  # checked when the table was built
    return [c.value.mean, c.value.low, c.value.high]
