"""`moerge library ...`: create, fill, inspect and check an expert library (a folder or fsspec URL)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from moerge.cli.help import PROMPT_FORMAT_HELP, prompt_format_option
from moerge.progress import output_console, styled
from moerge.tables import Column, Table, cell

if TYPE_CHECKING:
    from moerge.library import ExpertLibrary, ExpertMeta

app = typer.Typer(help="Keep experts in a library: catalog, import, export, verification.", no_args_is_help=True)
console = output_console()

PATH = typer.Argument(..., help="Library folder or fsspec URL (file://, memory://, s3://...).")
NAME = typer.Argument(..., help="Expert name in the library.")


def _open(path: str) -> ExpertLibrary:
    from moerge.library import ExpertLibrary

    return ExpertLibrary(path)


def create(path: str = PATH) -> None:
    """Make an empty library (folder of experts plus an SQLite catalog)."""
    from moerge.library import ExpertLibrary

    lib = ExpertLibrary.create(path)
    console.print(f"created library {lib.url}")


def add(
    path: str = PATH,
    expert_dir: Path = typer.Argument(..., help="Expert folder (peft files + moerge.json)."),
    name: str | None = typer.Option(None, "--name", "-n", help="Name in the library (default: moerge.json's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an expert of the same name."),
    skip_links: bool = typer.Option(
        False,
        "--skip-links",
        help="Leave out symbolic links and special files (FIFOs, sockets, devices) instead of refusing the "
        "folder; files moerge.json lists are never left out.",
    ),
) -> None:
    """Copy an expert in (regular files only): verified against its sha256s, then swapped in atomically."""
    from moerge.paths import special_entries

    left_out = special_entries(expert_dir) if skip_links and expert_dir.is_dir() else []
    name = _open(path).add(expert_dir, name=name, overwrite=overwrite, skip_links=skip_links)
    console.print(f"added {name}", highlight=False)
    for rel, what in left_out:
        console.print(f"left out {rel}: {what}", highlight=False)


def import_peft(
    path: str = PATH,
    adapter_dir: Path = typer.Argument(..., help="A plain peft adapter folder (adapter_config.json + safetensors)."),
    task: str = typer.Option(..., "--task", "-t", help="What the adapter was trained on."),
    base: str = typer.Option(..., "--base", "-b", help="Base model (folder or hub id) it was trained on."),
    name: str | None = typer.Option(None, "--name", "-n", help="Name in the library (default: folder name)."),
    prompt_format: str | None = typer.Option(
        None,
        "--prompt-format",
        help=f"{PROMPT_FORMAT_HELP}, that the adapter was trained with (default: recorded as unknown)",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an expert of the same name."),
) -> None:
    """Add an adapter trained with plain peft; its base is checked and missing metadata marked unknown.

    Say how its training prompts looked with --prompt-format (plain: the chat template around the bare
    input), so eval, compare and routers ask it the same way; without it the format is recorded as
    unknown and scoring warns.
    """
    from moerge.data.formats import format_name

    fmt = prompt_format_option(prompt_format)
    lib = _open(path)
    name = lib.import_peft(adapter_dir, task=task, base=base, name=name, prompt_format=fmt, overwrite=overwrite)
    meta = lib.meta(name)
    console.print(
        f"imported {name} ({meta.method}, prompt format {format_name(meta.prompt_format)}, "
        f"base check: {meta.provenance.get('base_check')})"
    )


def _metrics_text(metrics: dict[str, Any]) -> str:
    """Headline numbers only: a split's evaluation shows its accuracy and n, not its per-example scores."""
    return ", ".join(f"{key}={_metric_value(value)}" for key, value in sorted(metrics.items()))


def _metric_value(value: Any) -> str:
    if isinstance(value, dict) and "accuracy" in value:
        accuracy = value["accuracy"]
        shown = f"{accuracy:.3f}" if isinstance(accuracy, float) else str(accuracy)
        return f"{shown} (n={value['n']})" if "n" in value else shown
    if isinstance(value, dict):
        return "{" + _metrics_text(value) + "}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


_LIST_COLUMNS = tuple(
    Column(key, key.replace("_", " "))
    for key in ("name", "task", "method", "rank", "prompt_format", "base", "metrics", "created")
)


def _table(metas: list[ExpertMeta]) -> Table:
    """`moerge library list`'s table, as the shared table value: names are shown as typed, never read as markup."""
    from moerge.data.formats import format_name
    from moerge.library.expert import recorded_format

    rows = [
        [
            cell(meta.name),
            cell(meta.task.name),
            cell(meta.method),
            cell(meta.hyperparameters.get("rank")),
            cell(format_name(recorded_format(meta))),
            cell(f"{meta.base.name_or_path} ({meta.base.fingerprint[:8]})"),
            cell(_metrics_text(meta.metrics)),
            cell(datetime.fromtimestamp(meta.created).strftime("%Y-%m-%d %H:%M")),
        ]
        for meta in metas
    ]
    return Table("", _LIST_COLUMNS, rows)


def list_experts(
    path: str = PATH,
    task: str | None = typer.Option(None, help="Only experts for this task."),
    method: str | None = typer.Option(None, help="Only this method (lora, dora, ...)."),
    base: str | None = typer.Option(None, help="Only this base (name/path or fingerprint)."),
    metric: str | None = typer.Option(None, help="Only experts reporting this metric (a.b for nested)."),
    min_value: float | None = typer.Option(None, "--min", help="With --metric: at least this value."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List experts, optionally filtered."""
    metas = _open(path).list(task=task, method=method, base=base, metric=metric, min_value=min_value)
    if as_json:
        typer.echo(json.dumps([m.model_dump(mode="json") for m in metas], indent=2))
    else:
        console.print(_table(metas).to_rich())


def show(path: str = PATH, name: str = NAME) -> None:
    """Print an expert's moerge.json."""
    typer.echo(json.dumps(_open(path).meta(name).model_dump(mode="json"), indent=2, sort_keys=True))


def remove(path: str = PATH, name: str = NAME) -> None:
    """Delete an expert (folder and catalog entry together)."""
    _open(path).remove(name)
    console.print(f"removed {name}")


def export(
    path: str = PATH,
    name: str = NAME,
    out: Path = typer.Argument(..., help="New folder for the expert's files."),
    peft_only: bool = typer.Option(False, "--peft-only", help="Leave moerge.json out: peft's files alone."),
) -> None:
    """Write an expert as a folder that loads with PeftModel.from_pretrained, with its moerge.json (its
    prompt format, provenance and hashes) so `library add` elsewhere keeps its record."""
    dest = _open(path).export(name, out, peft_only=peft_only)
    console.print(f"exported {name} to {dest}")


def verify(path: str = PATH, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Recompute every file's sha256; exit 1 if anything is corrupted, missing, unregistered or left over
    by an interrupted write."""
    report = _open(path).verify()
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for name, problems in report.corrupted.items():
            console.print(styled(("corrupted", "red"), f" {name}: {problems[0]}"))
        for name in report.missing:
            console.print(styled(("missing", "red"), f" {name}: registered, but its folder is gone"))
        for name in report.unregistered:
            console.print(styled(("unregistered", "yellow"), f" {name}: run `moerge library rebuild`"))
        for entry in report.leftovers:
            leftover = f" {entry}: left by an interrupted write; `moerge library rebuild` removes it"
            console.print(styled(("leftover", "yellow"), leftover))
        status = ("ok", "green") if report.ok else ("problems found", "red")
        console.print(styled(status, f": {report.checked} experts checked"))
    if not report.ok:
        raise typer.Exit(1)


def rebuild(path: str = PATH) -> None:
    """Regenerate the catalog from the experts' moerge.json files; remove leftovers of interrupted writes."""
    from moerge.library import ExpertLibrary

    names = ExpertLibrary(path, repair_catalog=True).rebuild()
    console.print(f"catalog rebuilt: {len(names)} experts")


def register(root: typer.Typer) -> None:
    for func, name in (
        (create, "create"),
        (add, "add"),
        (import_peft, "import-peft"),
        (list_experts, "list"),
        (show, "show"),
        (remove, "remove"),
        (export, "export"),
        (verify, "verify"),
        (rebuild, "rebuild"),
    ):
        app.command(name)(func)
    root.add_typer(app, name="library")
