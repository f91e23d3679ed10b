"""The demo flow: train (or reuse) one expert per task in a library, score base vs expert, print a table."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from moerge.library.recipe import LibraryRecipe, load_recipe
from moerge.paths import write_json_atomic

console = Console()


def load_demo_recipe(path: Path | None, out: Path) -> LibraryRecipe:
    """The packaged recipe unless one is given; a relative library path lives under `out`."""
    if path is None:
        path = Path(str(resources.files("moerge.recipes").joinpath("demo.yaml")))
        recipe = load_recipe(path)
        library = Path(recipe.library)
        return recipe.model_copy(update={"library": str(out.resolve() / library.relative_to(path.parent.resolve()))})
    return load_recipe(path)


def run_demo(recipe_path: Path | None, out: Path) -> list[dict[str, Any]]:
    from moerge.data.loaders import load_task
    from moerge.eval import evaluate_task
    from moerge.library import ExpertLibrary
    from moerge.models import fetch_model, fingerprint, load_base
    from moerge.train.library import entry_config, train_library

    recipe = load_demo_recipe(recipe_path, out)
    base_path = fetch_model(recipe.base)
    console.print(f"base model: {recipe.base} ({base_path})\nlibrary: {recipe.library}")
    recipe = recipe.model_copy(update={"base": str(base_path)})
    train_library(recipe)
    library = ExpertLibrary(recipe.library)
    base_fp = fingerprint(base_path)
    cache_file = out / "base_scores.json"
    base_scores = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    rows = []
    for entry in recipe.tasks:
        cfg = entry_config(recipe, entry)
        meta = library.meta(entry.expert_name)
        task = load_task(cfg.task, seed=cfg.seed, limit=cfg.limit)
        key = f"{base_fp}|{task.data_hash()}|{cfg.eval_limit}"
        if key not in base_scores:
            console.print(f"scoring the base model on {task.name} ...")
            model, tokenizer = load_base(base_path)
            result = evaluate_task(model, tokenizer, task, split="test", limit=cfg.eval_limit)
            base_scores[key] = {k: v for k, v in result.items() if k != "scores"}
            write_json_atomic(cache_file, base_scores)
        expert = meta.metrics["test"]
        rows.append(
            {
                "task": entry.expert_name,
                "n": expert["n"],
                "base": base_scores[key]["accuracy"],
                "expert": expert["accuracy"],
                "train_time_s": meta.cost["train_time_s"],
                "trainable_params": meta.cost["trainable_params"],
                "peak_memory_mb": meta.cost["peak_memory_mb"],
            }
        )
    write_json_atomic(out / "results.json", rows)
    console.print(results_table(rows))
    console.print(f"results: {out / 'results.json'}")
    return rows


def results_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(
        "task",
        "n test",
        "base acc",
        "expert acc",
        "Δ",
        "train time",
        "trainable params",
        "peak mem",
        title="base vs its LoRA expert, test split",
    )
    for r in rows:
        table.add_row(
            r["task"],
            str(r["n"]),
            f"{r['base']:.3f}",
            f"{r['expert']:.3f}",
            f"{r['expert'] - r['base']:+.3f}",
            f"{r['train_time_s']:.0f} s",
            f"{r['trainable_params']:,}",
            f"{r['peak_memory_mb']:.0f} MB",
        )
    return table
