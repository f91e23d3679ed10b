"""`moerge demo`: the README's first command — the main job on the real packaged model."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    recipe: Path | None = typer.Option(None, "--recipe", help="demo recipe YAML (default: the packaged one)"),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="where experts and results go"),
) -> None:
    """Train one LoRA expert per real task on SmolLM2-135M-Instruct and compare each with the base."""
    from moerge.recipes.demo import run_demo

    run_demo(recipe, out)
