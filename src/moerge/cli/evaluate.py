"""`moerge eval` and `moerge generate`: score or query a base model, an expert, or a router."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from moerge.cli.help import PROMPT_FORMAT_HELP, prompt_format_option
from moerge.errors import MoergeError
from moerge.models.loading import set_load_defaults
from moerge.models.precision import DEVICE_HELP, DEVICE_MAP_HELP, DTYPE_HELP
from moerge.progress import output_console

if TYPE_CHECKING:
    from moerge.data.formats import PromptFormat
    from moerge.recipes.strategies import Loaded

console = output_console()
errors = output_console(stderr=True)


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
    task: str | None = typer.Option(
        None, "--task", help="data file, datasets folder, gym:<name> or bigbench:<task> (moerge's own harness)"
    ),
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
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    device_map: str | None = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
    predictions: Path | None = typer.Option(
        None,
        "--predictions",
        help="also write one JSON line per example (prompt, answer, target, score, choice log-probs, experts used)",
    ),
    harness: str = typer.Option("moerge", "--harness", help="moerge (scores --task) or lm-eval (scores --tasks)"),
    tasks: str | None = typer.Option(None, "--tasks", help="lm-eval task names, comma-separated (--harness lm-eval)"),
    include_path: Path | None = typer.Option(
        None, "--include-path", help="folder of your own lm-eval task YAMLs (--harness lm-eval)"
    ),
    num_fewshot: int | None = typer.Option(None, "--num-fewshot", help="lm-eval few-shot examples (--harness lm-eval)"),
) -> None:
    """Score a model on a task split: rank classification for multiple choice, else generation.

    Examples are rendered in the prompt format the expert (or the router's experts) was trained with,
    as recorded in its moerge.json; --prompt-format overrides it (a warning says when they differ).
    With --harness lm-eval, lm-evaluation-harness scores its --tasks in its own prompts instead.
    """
    from moerge.data.loaders import load_task
    from moerge.eval import evaluate_task

    at_least(1, limit=limit, task_limit=task_limit, batch_size=batch_size)
    at_least(0, num_fewshot=num_fewshot)
    set_load_defaults(dtype=dtype, device=device, device_map=device_map)
    if _harness(
        harness, task=task, tasks=tasks, task_limit=task_limit, prompt_format=prompt_format, predictions=predictions
    ):
        _eval_lm_eval(base, adapter, router, tasks or "", include_path, limit, num_fewshot, batch_size, json_out)
        return
    if task is None:
        raise MoergeError("--task: required (or --harness lm-eval --tasks T1,T2)")
    override = prompt_format_option(prompt_format)
    if predictions is not None:
        check_file_target(predictions, "--predictions")
    loaded_task = load_task(task, seed=seed, limit=task_limit)
    loaded = _load(base, adapter, router)
    fmt = _scoring_format(loaded, override)
    metrics = evaluate_task(
        loaded.model,
        loaded.tokenizer,
        loaded_task,
        fmt=fmt,
        split=split,
        limit=limit,
        batch_size=batch_size,
        keep_predictions=predictions is not None,
    )
    metrics.pop("scores", None)
    rows = metrics.pop("predictions", None)
    if predictions is not None:
        write_predictions(predictions, rows or [], "--predictions")
    metrics.update(task=loaded_task.name, split=split, adapter=str(adapter) if adapter else None)
    if predictions is not None:
        metrics["predictions"] = str(predictions)
    if json_out:
        print(json.dumps(metrics, indent=2))
    else:
        console.print(
            f"{loaded_task.name} [{split}]: accuracy {metrics['accuracy']:.3f} on {metrics['n']} examples "
            f"({metrics['mode']}, prompt format {fmt.name})"
        )


def check_file_target(path: Path, flag: str) -> None:
    """Before any work: `path` must be a new file or a regular file to replace, in an existing folder."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise MoergeError(f"{flag}: {path} exists and is not a regular file; choose a file path")
    if not path.parent.is_dir():
        raise MoergeError(f"{flag}: {path.parent} is not an existing folder")


def write_predictions(path: Path, rows: list[dict], flag: str) -> None:
    """One JSON object per line, written atomically (a reader never sees half a file)."""
    from moerge.paths import write_text_atomic

    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    try:
        write_text_atomic(path, text)
    except OSError as exc:
        raise MoergeError(f"{flag}: {path} cannot be written ({exc.strerror})") from None


def _scoring_format(loaded: Loaded, override: PromptFormat | None) -> PromptFormat:
    """The format to render prompts in; says once, on stderr, when it is not the model's own."""
    from moerge.data.formats import scoring_format

    fmt, note = scoring_format(loaded.prompt_format, None, override)
    if note:
        warn(note)
    return fmt


HARNESSES = ("moerge", "lm-eval")


def _harness(name: str, **given: object) -> bool:
    """True for lm-eval; refuses the flags that belong to the other harness (one line naming the flag)."""
    if name not in HARNESSES:
        raise MoergeError(f"--harness: {name!r} is not one of {', '.join(HARNESSES)}")
    if name == "moerge":
        if given.get("tasks") is not None:
            raise MoergeError("--tasks: lm-eval task names go with --harness lm-eval (moerge's harness takes --task)")
        return False
    for key in ("task", "task_limit", "prompt_format", "predictions"):
        if given.get(key) is not None:
            flag = f"--{key.replace('_', '-')}"
            raise MoergeError(f"{flag}: not used with --harness lm-eval (lm-eval reads and renders its --tasks itself)")
    if not given.get("tasks"):
        raise MoergeError("--tasks: give lm-eval task names (T1,T2) with --harness lm-eval")
    return True


def _eval_lm_eval(
    base: str,
    adapter: Path | None,
    router: Path | None,
    tasks: str,
    include_path: Path | None,
    limit: int | None,
    num_fewshot: int | None,
    batch_size: int,
    json_out: bool,
) -> None:
    """`moerge eval --harness lm-eval`: lm-eval's tasks on the loaded model; results in moerge's JSON."""
    try:
        from moerge.eval.harness import HarnessLM, lm_eval_version, run_lm_eval, summarize, task_names
        from moerge.recipes.harness import format_note
    except ImportError as exc:
        raise MoergeError(
            f"--harness lm-eval: lm-evaluation-harness is not installed ({exc.name}): pip install 'moerge[lm-eval]'"
        ) from None
    names = task_names(tasks)
    loaded = _load(base, adapter, router)
    if note := format_note(loaded):
        warn(note)
    lm = HarnessLM(loaded.model, loaded.tokenizer, batch_size=batch_size, info={"base": base})
    results = run_lm_eval(lm, names, include_path=include_path, limit=limit, num_fewshot=num_fewshot)
    out = {
        "harness": "lm-eval",
        "lm_eval_version": lm_eval_version(),
        "tasks": summarize(results),
        "base": base,
        "adapter": str(adapter) if adapter else None,
        "router": str(router) if router else None,
        "limit": limit,
        "num_fewshot": num_fewshot,
    }
    if json_out:
        print(json.dumps(out, indent=2))
        return
    for name, metrics in out["tasks"].items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k != "n" and not k.endswith("_stderr"))
        console.print(f"{name} [lm-eval]: {shown} on {metrics['n']} examples")


def generate_command(
    base: str = typer.Option(..., "--base", help="base model: cached name, local folder or hub id"),
    prompt: str = typer.Option(..., "--prompt", help="the user message"),
    adapter: Path | None = typer.Option(None, "--adapter", help="expert folder"),
    router: Path | None = typer.Option(None, "--router", help="router folder"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="length limit of the answer"),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    device_map: str | None = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
    prompt_format: str | None = typer.Option(
        None, "--prompt-format", help=f"{PROMPT_FORMAT_HELP} (default: the one the expert was trained with)"
    ),
) -> None:
    """Answer one prompt greedily with the base model, an expert, or a router."""
    from moerge.data.task import Example
    from moerge.eval.evaluate import generate_answers

    at_least(1, max_new_tokens=max_new_tokens)
    set_load_defaults(dtype=dtype, device=device, device_map=device_map)
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
