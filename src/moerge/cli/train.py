"""`moerge train`: train one expert from options or a YAML recipe."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from moerge.cli.help import field_help, option_values, prompt_format_option, registry_epilog
from moerge.errors import MoergeError
from moerge.train.config import TrainConfig
from moerge.train.methods import METHODS
from moerge.train.methods.base import LoraOptions

console = Console()


def methods_epilog() -> str:
    """Every training method with its options (flat flags/keys, `--option key=value`, or `method: {name, ...}`)."""
    return registry_epilog("Training methods and their options", ((n, m.options) for n, m in METHODS.items()))


def train(
    recipe: Path | None = typer.Argument(
        None, help="YAML file: the settings below (options given here win), optionally with a `stages:` list"
    ),
    base: str | None = typer.Option(None, "--base", help="base model: cached name, local folder or hub id"),
    task: str | None = typer.Option(None, "--task", help=field_help(TrainConfig, "task")),
    method: str | None = typer.Option(None, "--method", help=f"one of {', '.join(METHODS.names())} (default lora)"),
    out: Path | None = typer.Option(None, "--out", help=field_help(TrainConfig, "out")),
    rank: int | None = typer.Option(None, "--rank", help=field_help(LoraOptions, "rank")),
    alpha: float | None = typer.Option(None, "--alpha", help=field_help(LoraOptions, "alpha")),
    target_modules: str | None = typer.Option(None, "--target-modules", help=field_help(LoraOptions, "target_modules")),
    option: list[str] | None = typer.Option(
        None, "--option", help="any other option of the method, key=value (repeatable; see the list below)"
    ),
    lr: float | None = typer.Option(None, "--lr", help=field_help(TrainConfig, "lr")),
    steps: int | None = typer.Option(None, "--steps", help=field_help(TrainConfig, "steps")),
    epochs: float | None = typer.Option(None, "--epochs", help=field_help(TrainConfig, "epochs")),
    batch_size: int | None = typer.Option(None, "--batch-size", help=field_help(TrainConfig, "batch_size")),
    max_length: int | None = typer.Option(None, "--max-length", help=field_help(TrainConfig, "max_length")),
    seed: int | None = typer.Option(None, "--seed", help=field_help(TrainConfig, "seed")),
    limit: int | None = typer.Option(None, "--limit", help=field_help(TrainConfig, "limit")),
    eval_limit: int | None = typer.Option(None, "--eval-limit", help=field_help(TrainConfig, "eval_limit")),
    prompt_format: str | None = typer.Option(None, "--prompt-format", help=field_help(TrainConfig, "prompt_format")),
    checkpoint_every: int | None = typer.Option(
        None, "--checkpoint-every", help=field_help(TrainConfig, "checkpoint_every")
    ),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from its checkpoint"),
    restart: bool = typer.Option(False, "--restart", help="discard an interrupted run's checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing expert folder"),
    json_out: bool = typer.Option(False, "--json", help="print the expert's metadata as JSON"),
) -> None:
    """Train an expert and write its folder (peft files + moerge.json); YAML files may chain stages."""
    from moerge.recipes.train import train_expert
    from moerge.train.config import StagedConfig, config_from_dict, load_train_config

    options = {
        "base": base,
        "task": task,
        "method": method,
        "rank": rank,
        "alpha": alpha,
        "target_modules": target_modules,
        "lr": lr,
        "steps": steps,
        "epochs": epochs,
        "batch_size": batch_size,
        "max_length": max_length,
        "seed": seed,
        "limit": limit,
        "eval_limit": eval_limit,
        "prompt_format": prompt_format_option(prompt_format),
        "checkpoint_every": checkpoint_every,
        **option_values(option),
    }
    if recipe is not None:
        cfg: TrainConfig | StagedConfig = load_train_config(recipe, options)
    else:
        missing = [f"--{k}" for k in ("base", "task") if options[k] is None]
        if missing:
            raise MoergeError(f"missing {' and '.join(missing)} (or give a recipe file)")
        cfg = config_from_dict({k: v for k, v in options.items() if v is not None}, "command-line options")
    out = out or (Path(cfg.out) if cfg.out else None)
    if out is None:
        raise MoergeError("missing --out (the expert folder to write)")
    meta = train_expert(cfg, out, resume=resume, restart=restart, overwrite=overwrite)
    if json_out:
        console.print_json(meta.model_dump_json())
        return
    metric = next(iter(meta.metrics.values()), {}).get("accuracy")
    shown = f"{metric:.3f}" if isinstance(metric, float) else "n/a"
    stages = getattr(meta, "stages", None)
    shown += f" stages={len(stages)}" if stages else ""
    console.print(
        f"[green]expert written:[/green] {out}  task={meta.task.name} method={meta.method} "
        f"accuracy={shown} trainable={meta.cost['trainable_params']:,} "
        f"time={meta.cost['train_time_s']:.0f}s peak={meta.cost['peak_memory_mb']:.0f}MB"
    )


def train_library_command(
    recipe: Path = typer.Argument(..., help="YAML recipe: base, library, method, hyperparameters, tasks"),
    json_out: bool = typer.Option(False, "--json", help="print what was trained or reused as JSON"),
) -> None:
    """Train one expert per task of a recipe into a library; reruns skip finished experts and resume."""
    from moerge.recipes.library import load_library_config, train_library

    outcome = train_library(load_library_config(recipe))
    if json_out:
        console.print_json(data=outcome)
    else:
        for name, what in outcome.items():
            console.print(f"{name}: {what}")
