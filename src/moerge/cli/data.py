"""`moerge data ...`: look at a task before training on it."""

from __future__ import annotations

import typer
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from moerge.data.task import Example
from moerge.progress import output_console

app = typer.Typer(help="Inspect tasks: data files, datasets folders, gym:<generator>, bigbench:<task>.")
console = output_console()


def _example_panel(index: int, example: Example) -> Panel:
    """Input, choices (the target marked) and target; plain Text so task data is never read as markup."""
    parts: list[Text] = [Text("input: ", style="bold") + Text(example.input)]
    if example.choices:
        for choice in example.choices:
            mark = "*" if choice == example.target else " "
            parts.append(Text(f"  {mark} ") + Text(choice, style="green" if mark == "*" else ""))
    parts.append(Text("target: ", style="bold") + Text(example.target, style="green"))
    return Panel(Group(*parts), title=f"example {index}", title_align="left")


@app.command("show")
def show(
    task: str = typer.Argument(
        ..., help="A .jsonl/.csv/.parquet file, a saved datasets folder, gym:<generator> or bigbench:<task>."
    ),
    n: int = typer.Option(3, "--n", help="How many examples to print."),
    seed: int = typer.Option(0, "--seed", help="Seed of the train/validation/test split."),
    limit: int | None = typer.Option(None, "--limit", help="Keep at most this many examples in all (at least 1)."),
    split: str = typer.Option("train", "--split", help="Which split to print examples from."),
) -> None:
    """Print a task's split sizes, whether it is multiple-choice, and a few formatted examples."""
    from moerge.cli.evaluate import at_least
    from moerge.data.loaders import load_task

    at_least(0, n=n)
    at_least(1, limit=limit)
    loaded = load_task(task, seed=seed, limit=limit)
    examples = loaded.split(split)
    table = Table(title=loaded.name)
    for column in ("train", "validation", "test", "multiple-choice"):
        table.add_column(column, justify="right")
    sizes = loaded.sizes()
    table.add_row(
        *(str(sizes[s]) for s in ("train", "validation", "test")),
        "yes" if loaded.is_multiple_choice else "no",
    )
    console.print(table)
    console.print(Text(f"source: {loaded.source}"), soft_wrap=True)
    if loaded.description:
        console.print(Text(loaded.description, style="italic"))
    for i, example in enumerate(examples[:n], start=1):
        console.print(_example_panel(i, example))
