"""`moerge compare`: held-in, held-out, forgetting and cost of every strategy in one table."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from moerge.cli.help import PROMPT_FORMAT_HELP, prompt_format_option
from moerge.progress import output_console

console = output_console()


def compare(
    recipe: Path | None = typer.Argument(None, help="compare recipe YAML (default: the packaged demo recipe)"),
    out: Path = typer.Option(Path("runs/compare"), "--out", help="folder for results, caches and reports"),
    json_out: bool = typer.Option(False, "--json", help="print results.json's rows instead of the table"),
    retrain: bool = typer.Option(
        False, "--retrain", help="replace library experts of the recipe's names that other settings trained"
    ),
    prompt_format: str | None = typer.Option(
        None,
        "--prompt-format",
        help=f"{PROMPT_FORMAT_HELP}: score every strategy in it (default: each in the one its experts were "
        "trained with; the recipe's prompt_format for the base and held-out tasks)",
    ),
) -> None:
    """Train or reuse the experts, then score base / oracle / multitask / merges / routers side by side.

    Writes results.json, results.csv, report.md and report.html (self-contained) into --out. Scores are
    cached by content: rerunning reuses them, a killed run resumes, a changed expert is re-scored.
    """
    from moerge.cli.evaluate import warn
    from moerge.recipes.compare import load_compare_config, run_compare
    from moerge.recipes.demo import packaged_recipe
    from moerge.recipes.report import format_notes, headline_conclusions, results_table

    override = prompt_format_option(prompt_format)
    loaded = load_compare_config(recipe) if recipe else packaged_recipe(out)
    if override is not None:
        loaded = loaded.model_copy(update={"override_prompt_format": override})
    results = run_compare(loaded, out, retrain=retrain)
    for note in format_notes(results):
        warn(note)
    if json_out:
        print(json.dumps(results["rows"], indent=2, default=str))
        return
    console.print(results_table(results).to_rich())
    for line in headline_conclusions(results):
        console.print(line, soft_wrap=True)
    console.print(f"report: {(out / 'report.html').resolve()}")
