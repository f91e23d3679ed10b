"""`moerge route build|explain`: prepare a router over library experts; show where routing weight goes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from moerge.cli.help import PROMPT_FORMAT_HELP, field_help, key_values, lazy_epilog, option_values, prompt_format_option
from moerge.errors import MoergeError
from moerge.progress import output_console

app = typer.Typer(help="Route among experts: build routers, explain their choices.", no_args_is_help=True)
console = output_console()


def routers_help() -> str:
    """Every router with its options, read from the options models (so the help cannot go stale)."""
    from moerge.route import ROUTERS

    lines = ["Routers (--router) and their options (--option key=value):"]
    for name, cls in ROUTERS.items():
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        model = cls.options_model
        options = [escape(f"  {key}: {field_help(model, key)}") for key in model.model_fields] or ["  no options"]
        lines += ["", f"[bold]{escape(name)}[/bold]: {escape(summary)}", *options]
    return "\n".join(lines)


def _experts(library: Any, names: str | None) -> dict[str, Path]:
    """Expert name → folder: library names (default all of them) or plain folder paths."""
    chosen = [n.strip() for n in names.split(",") if n.strip()] if names else None
    if library is None:
        if not chosen:
            raise MoergeError("--experts: give expert folders (comma-separated) or --library")
        folders = {Path(n).name: Path(n) for n in chosen}
        missing = [str(p) for p in folders.values() if not p.is_dir()]
        if missing:
            raise MoergeError(f"--experts: no such expert folder: {', '.join(missing)}")
        return folders
    return {n: Path(n) if Path(n).is_dir() else library.path(n) for n in chosen or library.names()}


def _default_base(experts: dict[str, Path]) -> str:
    from moerge.library.expert import read_expert_meta

    first = next(iter(experts.values()))
    if not (first / "moerge.json").is_file():
        raise MoergeError("--base: required (the experts do not record their base model)")
    return read_expert_meta(first).base.name_or_path


def build(
    router: str = typer.Option(..., "--router", "-r", help="Router to build (the routers are listed below)."),
    out: Path = typer.Option(..., "--out", "-o", help="Router folder to write."),
    library: str | None = typer.Option(None, "--library", "-l", help="Expert library (artifacts are cached)."),
    experts: str | None = typer.Option(None, help="Comma-separated expert names or folders (default: all)."),
    base: str | None = typer.Option(None, help="Base model (default: the experts' recorded base)."),
    policy: str | None = typer.Option(None, help="top_k, top_p, threshold or dense."),
    top_k: int | None = typer.Option(None, "--top-k", help="Experts per token/example (top_k)."),
    top_p: float | None = typer.Option(None, "--top-p", help="Probability mass to reach (top_p)."),
    threshold: float | None = typer.Option(None, help="Minimum probability (threshold)."),
    temperature: float | None = typer.Option(None, help="Scores are divided by this before the softmax."),
    granularity: str | None = typer.Option(None, help="token, example or task."),
    aggregation: str | None = typer.Option(None, help="mix (outputs) or merge (per-example ΔW)."),
    option: list[str] | None = typer.Option(
        None, "--option", help="Router option key=value (repeatable; JSON for mappings). Options are listed below."
    ),
    data: list[str] | None = typer.Option(None, "--data", help="expert=task spec for its training data."),
    prompt_format: str | None = typer.Option(
        None,
        "--prompt-format",
        help=f"{PROMPT_FORMAT_HELP}, that the experts' data is rendered in (default: the experts' own when "
        "they agree, else moerge)",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing router folder."),
) -> None:
    """Prepare a router over experts and write it as a folder (config.json + tensors.safetensors)."""
    from moerge.route import build_router, get_router
    from moerge.yamlconf import Source

    options = get_router(router, field="--router").parse_options(option_values(option), Source("--option"))
    fmt = prompt_format_option(prompt_format)
    lib = None
    if library is not None:
        from moerge.library import ExpertLibrary

        lib = ExpertLibrary(library)
    folders = _experts(lib, experts)
    training_data = key_values(data, "--data")
    unknown = sorted(set(training_data or {}) - set(folders))
    if unknown:
        raise MoergeError(f"--data: {unknown[0]!r} is not one of the experts ({', '.join(folders)})")
    overrides = {
        "name": policy,
        "k": top_k,
        "p": top_p,
        "threshold": threshold,
        "temperature": temperature,
        "granularity": granularity,
        "aggregation": aggregation,
    }
    with console.status(f"building {router} router over {len(folders)} experts"):
        path = build_router(
            router,
            folders,
            out,
            base=base or _default_base(folders),
            policy=overrides,
            options=options,
            data=training_data,
            library=lib,
            prompt_format=fmt,
            overwrite=overwrite,
        )
    console.print(f"router written to {path}")


def explain(
    router: Path = typer.Option(..., "--router", "-r", help="Router folder."),
    task: list[str] = typer.Option(..., "--task", "-t", help="Task spec (repeatable)."),
    base: str | None = typer.Option(None, help="Base model (default: the one the router was built on)."),
    split: str = typer.Option("test", help="Which split's prompts to route."),
    limit: int = typer.Option(32, help="Examples per task."),
    layers: bool = typer.Option(False, "--layers", help="Also show the weights per layer."),
    prompt_format: str | None = typer.Option(
        None, "--prompt-format", help=f"{PROMPT_FORMAT_HELP} (default: the experts' own when they agree)"
    ),
) -> None:
    """Print, per task, the routing weight each expert received (averaged over tokens and layers)."""
    from moerge.cli.evaluate import at_least, warn
    from moerge.data import load_task
    from moerge.data.formats import scoring_format
    from moerge.models import load_base
    from moerge.route import load_routed, read_router_config
    from moerge.route.explain import explain_routing

    at_least(1, limit=limit)
    override = prompt_format_option(prompt_format)
    config = read_router_config(router)
    model, tokenizer = load_base(base or config.get("base", {}).get("name_or_path", ""))
    model = load_routed(model, router, tokenizer=tokenizer)
    tasks = {}
    for spec in task:
        loaded = load_task(spec)
        tasks[loaded.name] = loaded.split(split)[:limit]
    fmt, note = scoring_format(model.moerge_routing.prompt_format, None, override)
    if note:
        warn(note)
    report = explain_routing(model, tokenizer, tasks, dict.fromkeys(tasks, fmt))
    experts = [e["name"] for e in config["experts"]]
    table = Table("task", *experts, "top-1 expert", title=f"routing weight ({config['router']})")
    for name, row in report.items():
        top = experts[max(range(len(experts)), key=row["top1"].__getitem__)]
        table.add_row(name, *(f"{w:.3f}" for w in row["overall"]), top)
    console.print(table)
    if layers:
        for name, row in report.items():
            per_layer = Table("module", *experts, title=f"{name}: per layer")
            for module, weights in row["layers"].items():
                per_layer.add_row(module, *(f"{w:.3f}" for w in weights))
            console.print(per_layer)


def register(root: typer.Typer) -> None:
    app.command("build", cls=lazy_epilog(routers_help))(build)
    app.command("explain")(explain)
    root.add_typer(app, name="route")
