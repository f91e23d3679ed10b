"""`moerge train`: train one expert from options or a YAML recipe."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from moerge.errors import MoergeError

console = Console()


def train(
    recipe: Path | None = typer.Argument(
        None, help="YAML recipe: the options below (options win), optionally with a `stages:` list"
    ),
    base: str | None = typer.Option(None, "--base", help="base model: cached name, local folder or hub id"),
    task: str | None = typer.Option(None, "--task", help="data file, datasets folder, gym:<name> or bigbench:<task>"),
    method: str | None = typer.Option(
        None,
        "--method",
        help="lora, dora, rslora, pissa, olora, eva, corda, lora_ga, ia3, full, hft, bitfit or freeze_lower",
    ),
    out: Path | None = typer.Option(None, "--out", help="expert folder to write"),
    rank: int | None = typer.Option(None, "--rank", help="adapter rank r (default 8)"),
    alpha: float | None = typer.Option(None, "--alpha", help="LoRA alpha (default 16)"),
    target_modules: str | None = typer.Option(None, "--target-modules", help="comma-separated module names"),
    lr: float | None = typer.Option(None, "--lr", help="learning rate (default: the method's)"),
    steps: int | None = typer.Option(None, "--steps", help="optimizer steps (overrides --epochs)"),
    epochs: float | None = typer.Option(None, "--epochs", help="passes over the training split (default 1)"),
    batch_size: int | None = typer.Option(None, "--batch-size", help="examples per step (default 8)"),
    max_length: int | None = typer.Option(None, "--max-length", help="max tokens per example (default 256)"),
    seed: int | None = typer.Option(None, "--seed", help="seed for splits, init and data order (default 0)"),
    limit: int | None = typer.Option(None, "--limit", help="use at most this many examples of the task"),
    eval_limit: int | None = typer.Option(None, "--eval-limit", help="evaluate on at most this many test examples"),
    checkpoint_every: int | None = typer.Option(
        None, "--checkpoint-every", help="save a checkpoint every N steps (default 20)"
    ),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from its checkpoint"),
    restart: bool = typer.Option(False, "--restart", help="discard an interrupted run's checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing expert folder"),
    json_out: bool = typer.Option(False, "--json", help="print the expert's metadata as JSON"),
) -> None:
    """Train an expert and write its folder (peft files + moerge.json); recipes may chain stages."""
    from moerge.recipes.train import train_expert, train_recipe
    from moerge.train import TrainConfig, load_recipe
    from moerge.train.config import Recipe, config_from_dict

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
        "checkpoint_every": checkpoint_every,
    }
    if recipe is not None:
        cfg: TrainConfig | Recipe = load_recipe(recipe, options)
    else:
        missing = [f"--{k}" for k in ("base", "task") if options[k] is None]
        if missing:
            raise MoergeError(f"missing {' and '.join(missing)} (or give a recipe file)")
        cfg = config_from_dict({k: v for k, v in options.items() if v is not None})
    out = out or (Path(cfg.out) if cfg.out else None)
    if out is None:
        raise MoergeError("missing --out (the expert folder to write)")
    run = train_recipe if isinstance(cfg, Recipe) else train_expert
    meta = run(cfg, out, resume=resume, restart=restart, overwrite=overwrite)
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
    from moerge.recipes.library import load_recipe as load_library_recipe
    from moerge.recipes.library import train_library

    outcome = train_library(load_library_recipe(recipe))
    if json_out:
        console.print_json(data=outcome)
    else:
        for name, what in outcome.items():
            console.print(f"{name}: {what}")
