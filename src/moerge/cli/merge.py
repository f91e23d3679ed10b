"""`moerge merge`: merge experts into a new adapter or a full model."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from moerge.cli.help import field_help, lazy_epilog
from moerge.errors import MoergeError
from moerge.progress import output_console, styled

console = output_console()


def methods_help() -> str:
    """Every merge method with its options, read from the options models (so the help cannot go stale).
    Options every method takes are listed once; each method then lists only its own."""
    from moerge.merge.methods import MERGE_METHODS, MergeOptions

    def option_lines(model: type[MergeOptions], names: list[str]) -> list[str]:
        return [escape(f"  --{name.replace('_', '-')}: {field_help(model, name)}") for name in names]

    shared = {name: field.default for name, field in MergeOptions.model_fields.items()}
    lines = ["Every merge method takes (flags, or `parameters:` in a config):", *option_lines(MergeOptions, [*shared])]
    lines += ["", "Merge methods (--method) and their own options (and shared ones whose default they change):"]
    for name, method in MERGE_METHODS.items():
        fields = method.options.model_fields
        own = [n for n, field in fields.items() if n not in shared or field.default != shared[n]]
        lines += ["", f"[bold]{escape(name)}[/bold]: {escape(method.summary)}", *option_lines(method.options, own)]
    return "\n".join(lines)


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
    method: str | None = typer.Option(None, "--method", "-m", help="Merge method (the methods are listed below)."),
    density: float | None = typer.Option(None, help="Method option (see the methods below)."),
    gamma: float | None = typer.Option(None, help="Method option (see the methods below)."),
    scaling: float | None = typer.Option(None, help="Option of every method (see below)."),
    majority_sign: str | None = typer.Option(None, help="Method option (see the methods below)."),
    lines_alpha: float | None = typer.Option(None, help="Option of every method (see below)."),
    lines_beta: float | None = typer.Option(None, help="Option of every method (see below)."),
    seed: int | None = typer.Option(None, help="Method option (see the methods below)."),
    common_fraction: float | None = typer.Option(None, help="Method option (see the methods below)."),
    inner: str | None = typer.Option(None, help="Method option (see the methods below)."),
    rank: int | None = typer.Option(None, help="Adapter rank (SVD); linear merges are exact without it."),
    kind: str | None = typer.Option(None, help="Output: adapter (LoRA) or full (base + update)."),
    base: str | None = typer.Option(None, help="Base model folder or name (for --kind full)."),
    out: str | None = typer.Option(None, "--out", "-o", help="Library name (adapter + library) or folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
) -> None:
    """Merge experts into one LoRA adapter or a full model. A flag a method does not take is refused."""
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
            "common_fraction": common_fraction,
            "inner": inner,
        },
        "output": {"kind": kind, "rank": rank, "base": base, "out": out, "overwrite": overwrite or None},
    }
    if config is None and method is None:
        raise MoergeError(f"--method: required without a config file (known: {', '.join(MERGE_METHODS.names())})")
    spec = load_merge_spec(config, flags)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"merging ({spec.method})", total=None)

        def progress(done: int, total: int, module: str) -> None:
            bar.update(task, completed=done, total=total, description=f"{spec.method}: {module}")

        result = run_merge(spec, progress)
    console.print(styled(f"merged {len(spec.experts)} experts with {spec.method} → ", (str(result.path), "bold")))
    if result.reconstruction_error:
        errors = result.reconstruction_error.values()
        console.print(
            f"SVD to rank {result.meta.hyperparameters['rank']}: relative reconstruction error"
            f" mean {sum(errors) / len(errors):.4f}, max {max(errors):.4f} over {len(errors)} modules"
        )


def register(app: typer.Typer) -> None:
    app.command("merge", cls=lazy_epilog(methods_help))(merge)
