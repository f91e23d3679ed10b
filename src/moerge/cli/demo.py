"""`moerge demo`: the README's first command — the main job on the real packaged model."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    recipe: Path | None = typer.Option(None, "--recipe", help="compare recipe YAML (default: the packaged one)"),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="where the library, caches and reports go"),
) -> None:
    """Compare base, oracle experts, multitask, merges and routers on SmolLM2-135M-Instruct and real tasks.

    First run trains the experts (kept in a library under --out); reruns reuse experts and scores.
    """
    from moerge.recipes.demo import run_demo

    run_demo(recipe, out)
