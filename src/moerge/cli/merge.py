"""`moerge merge`: merge experts into a new adapter or a full model."""

from __future__ import annotations

from pathlib import Path

import typer

from moerge.errors import MoergeError
from moerge.progress import output_console

console = output_console()


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [part.strip() for part in value.split(",") if part.strip()]


def _floats(value: str | None, flag: str) -> list[float] | None:
    parts = _split(value)
    if parts is None:
        return None
    try:
        return [float(part) for part in parts]
    except ValueError:
        raise MoergeError(f"{flag}: expected comma-separated numbers, got {value!r}") from None


def merge(
    config: Path | None = typer.Argument(None, help="YAML merge config (flags override it)."),
    library: str | None = typer.Option(None, "--library", "-l", help="Expert library; experts are names."),
    experts: str | None = typer.Option(None, help="Comma-separated expert names (or folders without a library)."),
    weights: str | None = typer.Option(None, help="Comma-separated weights, one per expert (default 1)."),
    method: str | None = typer.Option(None, "--method", "-m", help="Merge method, e.g. linear, ties, dare_ties."),
    density: float | None = typer.Option(None, help="Fraction of entries kept (ties, dare, breadcrumbs)."),
    gamma: float | None = typer.Option(None, help="Breadcrumbs: fraction of largest entries dropped."),
    scaling: float | None = typer.Option(None, help="λ multiplying the merged update."),
    majority_sign: str | None = typer.Option(None, help="Sign election: total or frequency."),
    lines_alpha: float | None = typer.Option(None, help="LiNeS: scale of the first layer's update."),
    lines_beta: float | None = typer.Option(None, help="LiNeS: added scale at the last layer."),
    seed: int | None = typer.Option(None, help="Seed for DARE's random drops."),
    rank: int | None = typer.Option(None, help="Adapter rank (SVD); linear merges are exact without it."),
    kind: str | None = typer.Option(None, help="Output: adapter (LoRA) or full (base + update)."),
    base: str | None = typer.Option(None, help="Base model folder or name (for --kind full)."),
    out: str | None = typer.Option(None, "--out", "-o", help="Library name (adapter + library) or folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
) -> None:
    """Merge experts (linear, task_arithmetic, ties, dare_*, breadcrumbs, magnitude_prune, lines, slerp)."""
    from rich.progress import Progress

    from moerge.merge import MERGE_METHODS, load_merge_spec, run_merge

    flags = {
        "method": method,
        "library": library,
        "experts": _split(experts),
        "weights": _floats(weights, "--weights"),
        "parameters": {
            "density": density,
            "gamma": gamma,
            "scaling": scaling,
            "majority_sign": majority_sign,
            "lines_alpha": lines_alpha,
            "lines_beta": lines_beta,
            "seed": seed,
        },
        "output": {"kind": kind, "rank": rank, "base": base, "out": out, "overwrite": overwrite or None},
    }
    if config is None and method is None:
        raise MoergeError(f"--method: required without a config file (known: {', '.join(sorted(MERGE_METHODS))})")
    spec = load_merge_spec(config, flags)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"merging ({spec.method})", total=None)

        def progress(done: int, total: int, module: str) -> None:
            bar.update(task, completed=done, total=total, description=f"{spec.method}: {module}")

        result = run_merge(spec, progress)
    console.print(f"merged {len(spec.experts)} experts with {spec.method} → [bold]{result.path}[/bold]")
    if result.reconstruction_error:
        errors = result.reconstruction_error.values()
        console.print(
            f"SVD to rank {result.meta.hyperparameters['rank']}: relative reconstruction error"
            f" mean {sum(errors) / len(errors):.4f}, max {max(errors):.4f} over {len(errors)} modules"
        )


def register(app: typer.Typer) -> None:
    app.command("merge")(merge)
