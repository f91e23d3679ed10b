"""The demo: `moerge compare` with the packaged recipe on the real model, plus a per-expert summary."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from moerge.eval.protocol import CompareRecipe, load_compare_recipe

console = Console()


def packaged_recipe(out: Path) -> CompareRecipe:
    """The shipped demo recipe, with its library kept under `out`."""
    recipe = load_compare_recipe(Path(str(resources.files("moerge.recipes").joinpath("demo.yaml"))))
    return recipe.model_copy(update={"library": str(out.resolve() / Path(recipe.library).name)})


def run_demo(recipe_path: Path | None, out: Path) -> dict[str, Any]:
    from moerge.cli.compare import results_table
    from moerge.eval.compare import run_compare
    from moerge.library import ExpertLibrary
    from moerge.models import PACKAGED, fetch_model

    recipe = load_compare_recipe(recipe_path) if recipe_path else packaged_recipe(out)
    if recipe.base in PACKAGED:
        console.print(f"base model: {recipe.base} ({fetch_model(recipe.base)})")
    results = run_compare(recipe, out)
    console.print(experts_table(results, ExpertLibrary(recipe.library), [e.expert_name for e in recipe.held_in]))
    console.print(results_table(results))
    console.print(f"report: {(out / 'report.html').resolve()}")
    return results


def experts_table(results: dict[str, Any], library: Any, names: list[str]) -> Table:
    """Base vs each task's own expert, with what the expert cost to train."""
    rows = {r["kind"]: r for r in results["rows"]}
    table = Table("task", "n test", "base acc", "expert acc", "Δ", "train time", "trainable params", "peak mem",
                  title="each held-in task: base vs its LoRA expert (test split)")
    for name in names:
        cost = library.meta(name).cost
        base = rows.get("base", {}).get("per_task", {}).get(name)
        expert = rows.get("oracle", {}).get("per_task", {}).get(name)
        table.add_row(
            name,
            str((expert or base or {}).get("n", "—")),
            f"{base['mean']:.3f}" if base else "—",
            f"{expert['mean']:.3f}" if expert else "—",
            f"{expert['mean'] - base['mean']:+.3f}" if base and expert else "—",
            f"{cost['train_time_s']:.0f} s",
            f"{cost['trainable_params']:,}",
            f"{cost['peak_memory_mb']:.0f} MB",
        )
    return table
