"""The `moerge` command: one typer app; each command group lives in its own module.

Modules stay thin (parse, call the library API, print). Heavy imports happen inside commands so
`--help` is instant.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from moerge.errors import MoergeError

app = typer.Typer(
    name="moerge",
    help="Train, keep, merge, route and compare fine-tuned experts on one base model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)


def _register() -> None:
    from moerge.cli import compare, data, demo, evaluate, library, merge, models, route, train
    from moerge.cli.help import lazy_epilog

    app.command("demo")(demo.demo)
    app.command("compare")(compare.compare)
    app.add_typer(models.app, name="models")
    app.add_typer(data.app, name="data")
    app.command("train", cls=lazy_epilog(train.methods_epilog))(train.train)
    app.command("train-library")(train.train_library_command)
    app.command("eval")(evaluate.eval_command)
    app.command("generate")(evaluate.generate_command)
    for module in (library, merge, route):
        module.register(app)


_register()


def run() -> None:
    """Entry point: user errors become one red line on stderr and exit status 2."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        app()
    except MoergeError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]")
        sys.exit(130)
