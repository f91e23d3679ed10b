"""`moerge eval` and `moerge generate`: score or query a base model, an expert, or a router."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from moerge.cli.help import PROMPT_FORMAT_HELP, prompt_format_option
from moerge.errors import MoergeError

if TYPE_CHECKING:
    from moerge.data.formats import PromptFormat
    from moerge.recipes.strategies import Loaded

console = Console()
errors = Console(stderr=True)


def warn(message: str) -> None:
    """One line on stderr: what the user should know about a result (never markup)."""
    errors.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)


def at_least(minimum: int, **flags: int | None) -> None:
    """Refuse a count option below `minimum` (one line naming the flag), before anything loads.
    Keywords are flag names with `_` for `-`: `at_least(1, limit=limit)` checks `--limit`."""
    for name, value in flags.items():
        if value is not None and value < minimum:
            raise MoergeError(f"--{name.replace('_', '-')}: must be at least {minimum}, got {value}")


def _load(base: str, adapter: Path | None, router: Path | None) -> Loaded:
    """The base, an expert or a router, through the same strategy registry `compare` uses."""
    from moerge.recipes.strategies import StrategySpec, Workspace, load_strategy

    if adapter is not None and router is not None:
        raise MoergeError("give --adapter or --router, not both")
    if router is not None:
        spec = StrategySpec.model_validate({"kind": "router", "path": str(router)})
    elif adapter is not None:
        spec = StrategySpec.model_validate({"kind": "expert", "path": str(adapter)})
    else:
        spec = StrategySpec.model_validate({"kind": "base"})
    return load_strategy(spec, Workspace(base=base))


def eval_command(
    base: str = typer.Option(..., "--base", help="base model: cached name, local folder or hub id"),
    task: str = typer.Option(..., "--task", help="data file, datasets folder, gym:<name> or bigbench:<task>"),
    adapter: Path | None = typer.Option(None, "--adapter", help="expert folder (moerge or plain peft)"),
    router: Path | None = typer.Option(None, "--router", help="router folder from `moerge route build`"),
    split: str = typer.Option("test", "--split", help="train, validation or test"),
    limit: int | None = typer.Option(None, "--limit", help="evaluate at most this many examples"),
    task_limit: int | None = typer.Option(None, "--task-limit", help="cap the task's examples before splitting"),
    seed: int = typer.Option(0, "--seed", help="seed of the task's splits (use the training seed)"),
    batch_size: int = typer.Option(16, "--batch-size", help="sequences per forward pass"),
    prompt_format: str | None = typer.Option(
        None, "--prompt-format", help=f"{PROMPT_FORMAT_HELP} (default: the one the expert was trained with)"
    ),
    json_out: bool = typer.Option(False, "--json", help="print metrics as JSON"),
) -> None:
    """Score a model on a task split: rank classification for multiple choice, else generation.

    Examples are rendered in the prompt format the expert (or the router's experts) was trained with,
    as recorded in its moerge.json; --prompt-format overrides it (a warning says when they differ).
    """
    from moerge.data.loaders import load_task
    from moerge.eval import evaluate_task

    at_least(1, limit=limit, task_limit=task_limit, batch_size=batch_size)
    override = prompt_format_option(prompt_format)
    loaded_task = load_task(task, seed=seed, limit=task_limit)
    loaded = _load(base, adapter, router)
    fmt = _scoring_format(loaded, override)
    metrics = evaluate_task(
        loaded.model, loaded.tokenizer, loaded_task, fmt=fmt, split=split, limit=limit, batch_size=batch_size
    )
    metrics.pop("scores")
    metrics.update(task=loaded_task.name, split=split, adapter=str(adapter) if adapter else None)
    if json_out:
        print(json.dumps(metrics, indent=2))
    else:
        console.print(
            f"{loaded_task.name} \\[{split}]: accuracy {metrics['accuracy']:.3f} on {metrics['n']} examples "
            f"({metrics['mode']}, prompt format {fmt.name})"
        )


def _scoring_format(loaded: Loaded, override: PromptFormat | None) -> PromptFormat:
    """The format to render prompts in; says once, on stderr, when it is not the model's own."""
    from moerge.data.formats import scoring_format

    fmt, note = scoring_format(loaded.prompt_format, None, override)
    if note:
        warn(note)
    return fmt


def generate_command(
    base: str = typer.Option(..., "--base", help="base model: cached name, local folder or hub id"),
    prompt: str = typer.Option(..., "--prompt", help="the user message"),
    adapter: Path | None = typer.Option(None, "--adapter", help="expert folder"),
    router: Path | None = typer.Option(None, "--router", help="router folder"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="length limit of the answer"),
    prompt_format: str | None = typer.Option(
        None, "--prompt-format", help=f"{PROMPT_FORMAT_HELP} (default: the one the expert was trained with)"
    ),
) -> None:
    """Answer one prompt greedily with the base model, an expert, or a router."""
    from moerge.data.task import Example
    from moerge.eval.evaluate import generate_answers

    at_least(1, max_new_tokens=max_new_tokens)
    override = prompt_format_option(prompt_format)
    loaded = _load(base, adapter, router)
    example = Example(input=prompt, target="")
    answers = generate_answers(
        loaded.model,
        loaded.tokenizer,
        [example],
        fmt=_scoring_format(loaded, override),
        batch_size=1,
        max_new_tokens=max_new_tokens,
        progress=False,
    )
    print(answers[0])
