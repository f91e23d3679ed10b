"""Tables printed to a log file or a pipe keep their numbers (rich would wrap them to 80 columns)."""

from __future__ import annotations

from rich.table import Table

from moerge.progress import OFF_TERMINAL_WIDTH, output_console


def _wide_table() -> Table:
    table = Table(*[f"column {i}" for i in range(10)])
    table.add_row(*["0.563 [0.51, 0.61]"] * 10)
    return table


def test_tables_off_a_terminal_are_not_truncated(monkeypatch, capsys):
    monkeypatch.delenv("COLUMNS", raising=False)
    console = output_console()
    assert console.width == OFF_TERMINAL_WIDTH
    console.print(_wide_table())
    assert capsys.readouterr().out.count("0.563 [0.51, 0.61]") == 10


def test_columns_still_decides_when_set(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert output_console().width == 100
