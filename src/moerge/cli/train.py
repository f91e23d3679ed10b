"""`moerge train`: train one expert from options or a YAML recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from moerge.cli.help import PROMPT_FORMAT_HELP, field_help, option_values, prompt_format_option, registry_epilog
from moerge.errors import MoergeError
from moerge.progress import output_console, styled
from moerge.train.config import StagedConfig, TrainConfig
from moerge.train.methods import METHODS
from moerge.train.methods.base import LoraOptions

console = output_console()


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
    objective: str | None = typer.Option(
        None,
        "--objective",
        help="finetune (next-token loss on --task), dpo (preference pairs, --preferences) or grpo (sampled"
        " answers to --task rewarded by its scorer)",
    ),
    preferences: str | None = typer.Option(None, "--preferences", help=field_help(TrainConfig, "preferences")),
    beta: float | None = typer.Option(None, "--beta", help=field_help(TrainConfig, "beta")),
    lr: float | None = typer.Option(None, "--lr", help=field_help(TrainConfig, "lr")),
    steps: int | None = typer.Option(None, "--steps", help=field_help(TrainConfig, "steps")),
    epochs: float | None = typer.Option(None, "--epochs", help=field_help(TrainConfig, "epochs")),
    batch_size: int | None = typer.Option(None, "--batch-size", help=field_help(TrainConfig, "batch_size")),
    max_length: int | None = typer.Option(None, "--max-length", help=field_help(TrainConfig, "max_length")),
    seed: int | None = typer.Option(None, "--seed", help=field_help(TrainConfig, "seed")),
    limit: int | None = typer.Option(None, "--limit", help=field_help(TrainConfig, "limit")),
    eval_limit: int | None = typer.Option(None, "--eval-limit", help=field_help(TrainConfig, "eval_limit")),
    prompt_format: str | None = typer.Option(None, "--prompt-format", help=f"{PROMPT_FORMAT_HELP} (default: moerge)"),
    checkpoint_every: int | None = typer.Option(
        None, "--checkpoint-every", help=field_help(TrainConfig, "checkpoint_every")
    ),
    dtype: str | None = typer.Option(None, "--dtype", help=field_help(TrainConfig, "dtype")),
    gradient_checkpointing: bool | None = typer.Option(
        None,
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help=field_help(TrainConfig, "gradient_checkpointing"),
    ),
    grad_accum: int | None = typer.Option(None, "--grad-accum", help=field_help(TrainConfig, "grad_accum")),
    quantize: str | None = typer.Option(None, "--quantize", help=field_help(TrainConfig, "quantize")),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="print the parameter counts and the peak memory estimate (`moerge plan`); train nothing",
    ),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from its checkpoint"),
    restart: bool = typer.Option(False, "--restart", help="discard an interrupted run's checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing expert folder"),
    json_out: bool = typer.Option(False, "--json", help="print the expert's metadata as JSON"),
) -> None:
    """Train an expert and write its folder (peft files + moerge.json); YAML files may chain stages."""
    from moerge.recipes.train import train_expert

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
        "dtype": dtype,
        "gradient_checkpointing": gradient_checkpointing,
        "grad_accum": grad_accum,
        "quantize": quantize,
        "type": objective,
        "preferences": preferences,
        "beta": beta,
        **option_values(option),
    }
    cfg = _config(recipe, options)
    if dry_run:
        _print_plan(cfg)
        return
    check_runnable(cfg)
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
        styled(
            ("expert written:", "green"),
            f" {out}  task={meta.task.name} method={meta.method} "
            f"accuracy={shown} trainable={meta.cost['trainable_params']:,} "
            f"time={meta.cost['train_time_s']:.0f}s peak={meta.cost['peak_memory_mb']:.0f}MB",
        )
    )


def _config(recipe: Path | None, options: dict[str, Any]) -> TrainConfig | StagedConfig:
    """The run's settings: the recipe file with the given options winning, or the options alone."""
    from moerge.train.config import config_from_dict, load_train_config

    if recipe is not None:
        return load_train_config(recipe, options)
    needed = ("base", "preferences") if options.get("type") == "dpo" else ("base", "task")
    missing = [f"--{k}" for k in needed if options[k] is None]
    if missing:
        raise MoergeError(f"missing {' and '.join(missing)} (or give a recipe file)")
    return config_from_dict({k: v for k, v in options.items() if v is not None}, "command-line options")


def check_runnable(cfg: TrainConfig | StagedConfig) -> None:
    """Refuse, before anything loads or is written, a precision this machine cannot train in (fp16 off
    CUDA, a quantised base without CUDA or bitsandbytes)."""
    from moerge.models.precision import resolve_device
    from moerge.train.loop import training_precision

    device = resolve_device("auto")
    for stage in cfg.stages if isinstance(cfg, StagedConfig) else [cfg]:
        training_precision(stage, device)


def _print_plan(cfg: TrainConfig | StagedConfig, json_out: bool = False) -> None:
    """The memory plan of each stage (one for a single run), as a table or JSON."""
    from moerge.train.plan import plan_training

    plans = [plan_training(stage) for stage in (cfg.stages if isinstance(cfg, StagedConfig) else [cfg])]
    if json_out:
        console.print_json(data=[p.as_dict() for p in plans] if len(plans) > 1 else plans[0].as_dict())
        return
    for plan in plans:
        print(plan.render())


def plan_command(
    recipe: Path | None = typer.Argument(None, help="YAML file, as for `moerge train` (options given here win)"),
    base: str | None = typer.Option(None, "--base", help="base model: cached name, local folder or hub id"),
    task: str | None = typer.Option(None, "--task", help="task spec (not read: the plan needs only its name)"),
    method: str | None = typer.Option(None, "--method", help=f"one of {', '.join(METHODS.names())} (default lora)"),
    rank: int | None = typer.Option(None, "--rank", help=field_help(LoraOptions, "rank")),
    target_modules: str | None = typer.Option(None, "--target-modules", help=field_help(LoraOptions, "target_modules")),
    option: list[str] | None = typer.Option(None, "--option", help="any other option of the method, key=value"),
    batch_size: int | None = typer.Option(None, "--batch-size", help=field_help(TrainConfig, "batch_size")),
    max_length: int | None = typer.Option(None, "--max-length", help=field_help(TrainConfig, "max_length")),
    dtype: str | None = typer.Option(None, "--dtype", help=field_help(TrainConfig, "dtype")),
    gradient_checkpointing: bool | None = typer.Option(
        None,
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help=field_help(TrainConfig, "gradient_checkpointing"),
    ),
    grad_accum: int | None = typer.Option(None, "--grad-accum", help=field_help(TrainConfig, "grad_accum")),
    quantize: str | None = typer.Option(None, "--quantize", help=field_help(TrainConfig, "quantize")),
    json_out: bool = typer.Option(False, "--json", help="print the plan as JSON"),
) -> None:
    """Trainable and total parameters and the peak memory a training run would need (weights,
    gradients, Adam state, activations, logits), and whether it fits this machine: from the model's
    config alone, before anything large is loaded."""
    options = {
        "base": base,
        "task": task or "plan",
        "method": method,
        "rank": rank,
        "target_modules": target_modules,
        "batch_size": batch_size,
        "max_length": max_length,
        "dtype": dtype,
        "gradient_checkpointing": gradient_checkpointing,
        "grad_accum": grad_accum,
        "quantize": quantize,
        **option_values(option),
    }
    if recipe is not None and task is None:
        options["task"] = None
    _print_plan(_config(recipe, options), json_out)


def train_library_command(
    recipe: Path = typer.Argument(..., help="YAML recipe: base, library, method, hyperparameters, tasks"),
    json_out: bool = typer.Option(False, "--json", help="print what was trained or reused as JSON"),
    retrain: bool = typer.Option(
        False, "--retrain", help="replace library experts of the recipe's names that other settings trained"
    ),
) -> None:
    """Train one expert per task of a recipe into a library; reruns skip finished experts and resume."""
    from moerge.recipes.library import load_library_config, train_library

    outcome = train_library(load_library_config(recipe), retrain=retrain)
    if json_out:
        console.print_json(data=outcome)
    else:
        for name, what in outcome.items():
            console.print(f"{name}: {what}")
