"""The README's option tables are generated from the options models and must be current."""

from pathlib import Path

from moerge.cli.docs import KINDS, main, options_markdown, update

README = Path(__file__).parents[2] / "README.md"


def test_readme_option_tables_are_current():
    text = README.read_text(encoding="utf-8")
    for kind in KINDS:
        assert f"<!-- options:{kind} -->" in text, kind
    assert update(text) == text, "README option tables are stale: run `make docs`"


def test_tables_list_every_registered_name_and_option():
    from moerge.merge.methods import MERGE_METHODS, TiesOptions

    merge = options_markdown("merge")
    assert all(f"`{name}`" in merge for name in MERGE_METHODS.names())
    assert all(f"`{option}`" in merge for option in TiesOptions.model_fields)
    assert "`rank` (default 8)" in options_markdown("train")


def test_check_mode_reports_a_stale_table(tmp_path, capsys):
    stale = tmp_path / "README.md"
    stale.write_text("intro\n<!-- options:route -->\n| old |\n<!-- /options:route -->\n")
    assert main([str(stale), "--check"]) == 1
    assert "stale" in capsys.readouterr().err
    assert main([str(stale)]) == 0
    assert "`arrow`" in stale.read_text() and "| old |" not in stale.read_text()
    assert main([str(stale), "--check"]) == 0
