"""One table value: rich, Markdown, HTML and CSV show the same headers and texts; nothing is read as markup."""

from __future__ import annotations

import csv
import io
from html.parser import HTMLParser

import pytest
from rich.console import Console

from moerge.tables import Cell, Column, Interval, Table, cell

NASTY = ["a|b", "<script>x</script>", "[bold]task[/bold]", "two\nlines", "back\\slash|pipe"]


@pytest.fixture
def table() -> Table:
    columns = [
        Column("name", "task [name]"),
        Column("kind", "kind", shown=False),
        Column("score", "score | acc", "right", interval=True),
        Column("n", "n <test>", "center"),
    ]
    rows = [
        [cell(text), cell("hidden"), Cell(Interval(0.123456789, 0.1, 0.2), "0.123 [0.10, 0.20]"), cell(3)]
        for text in NASTY
    ]
    rows.append([cell("missing"), cell(None), Cell(None, "—"), cell(0)])
    return Table("scores [dim]<b>", columns, rows)


def _shown_headers(table: Table) -> list[str]:
    return [c.header for c in table.columns if c.shown]


def _shown_texts(table: Table) -> list[list[str]]:
    keep = [i for i, c in enumerate(table.columns) if c.shown]
    return [[row[i].text for i in keep] for row in table.rows]


def _markdown_cells(line: str) -> list[str]:
    """Split a Markdown row at unescaped pipes and undo the escapes, as a GFM renderer would."""
    cells, text, escaped = [], "", False
    for char in line:
        if escaped:
            text, escaped = text + char, False
        elif char == "\\":
            escaped = True
        elif char == "|":
            cells.append(text)
            text = ""
        else:
            text += char
    return [c.strip().replace("<br>", "\n") for c in cells[1:]]


class _HtmlCells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.caption = ""
        self.ids: list[str | None] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.ids.append(dict(attrs).get("id"))
        if tag == "tr":
            self.rows.append([])
        if tag in ("th", "td"):
            self.rows[-1].append("")
        if tag in ("th", "td", "caption"):
            self._in = tag

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "caption":
            self.caption += data
        elif self._in:
            self.rows[-1][-1] += data


def test_markdown_shows_headers_and_texts_escaped(table):
    lines = table.to_markdown().splitlines()
    assert len(lines) == 2 + len(table.rows)  # a newline in a cell did not end its row
    assert _markdown_cells(lines[0]) == _shown_headers(table)
    assert lines[1] == "|---|---:|:---:|"
    assert [_markdown_cells(line) for line in lines[2:]] == _shown_texts(table)
    assert "| a\\|b |" in lines[2] and "two<br>lines" in lines[5] and "back\\\\slash\\|pipe" in lines[6]


def test_html_shows_headers_and_texts_escaped(table):
    page = table.to_html("scores")
    assert "<script>" not in page and "&lt;script&gt;" in page
    parsed = _HtmlCells()
    parsed.feed(page)
    assert parsed.ids == ["scores"] and parsed.caption == table.title
    assert parsed.rows == [_shown_headers(table), *_shown_texts(table)]


def test_rich_shows_headers_and_texts_as_plain_text(table):
    rich = table.to_rich()
    assert [c.header.plain for c in rich.columns] == _shown_headers(table)
    assert [[c.plain for c in column.cells] for column in rich.columns] == [
        list(col) for col in zip(*_shown_texts(table), strict=True)
    ]
    assert [c.justify for c in rich.columns] == ["left", "right", "center"]
    console = Console(file=io.StringIO(), width=300, color_system=None)
    console.print(rich)
    shown = console.file.getvalue()
    assert "[bold]task[/bold]" in shown and "task [name]" in shown and "scores [dim]<b>" in shown


def test_csv_has_every_column_by_key_and_numbers_stay_numbers(table):
    records = list(csv.DictReader(io.StringIO(table.to_csv())))
    assert list(records[0]) == ["name", "kind", "score", "score_ci_low", "score_ci_high", "n"]
    assert [r["name"] for r in records] == [*NASTY, "missing"]  # csv quoting keeps pipes and newlines
    assert records[0]["kind"] == "hidden"  # data-only columns still reach the CSV
    assert float(records[0]["score"]) == 0.123456789  # full precision, not the display text's 0.123
    assert (float(records[0]["score_ci_low"]), float(records[0]["score_ci_high"])) == (0.1, 0.2)
    assert int(records[0]["n"]) == 3
    assert [records[-1][k] for k in ("kind", "score", "score_ci_low", "score_ci_high")] == ["", "", "", ""]


def test_hidden_columns_stay_out_of_what_people_read(table):
    for text in (table.to_markdown(), table.to_html("t")):
        assert "hidden" not in text and "kind" not in text


def test_rows_must_fit_the_columns():
    columns = [Column("a", "a"), Column("b", "b", interval=True)]
    with pytest.raises(ValueError, match="2 columns"):
        Table("t", columns, [[cell(1)]])
    with pytest.raises(ValueError, match="does not fit"):
        Table("t", columns, [[cell(1), cell(0.5)]])  # a bare number in an interval column
    with pytest.raises(ValueError, match="does not fit"):
        Table("t", columns, [[Cell(Interval(1, 0, 2), "1"), cell(None)]])


def test_a_table_is_immutable(table):
    assert isinstance(table.rows, tuple) and all(isinstance(row, tuple) for row in table.rows)
    with pytest.raises(AttributeError):
        table.title = "other"  # type: ignore[misc]
