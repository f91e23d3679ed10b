"""`moerge data ...`: look at a task before training on it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from moerge.cli.help import PROMPT_FORMAT_HELP, prompt_format_option
from moerge.data.task import Example
from moerge.progress import output_console

if TYPE_CHECKING:
    from moerge.data.formats import PromptFormat

app = typer.Typer(help="Inspect tasks: data files, datasets folders, gym:<generator>, bigbench:<task>.")
console = output_console()


def _example_panel(index: int, example: Example) -> Panel:
    """Input, choices (the target marked) and target; plain Text so task data is never read as markup."""
    parts: list[Text] = [Text("input: ", style="bold") + Text(example.input)]
    if example.choices:
        for choice in example.choices:
            mark = "*" if choice == example.target else " "
            parts.append(Text(f"  {mark} ") + Text(choice, style="green" if mark == "*" else ""))
    parts.append(Text("target: ", style="bold") + Text(example.target, style="green"))
    return Panel(Group(*parts), title=f"example {index}", title_align="left")


@app.command("show")
def show(
    task: str = typer.Argument(
        ..., help="A .jsonl/.csv/.parquet file, a saved datasets folder, gym:<generator> or bigbench:<task>."
    ),
    n: int = typer.Option(3, "--n", help="How many examples to print."),
    seed: int = typer.Option(0, "--seed", help="Seed of the train/validation/test split."),
    limit: int | None = typer.Option(None, "--limit", help="Keep at most this many examples in all (at least 1)."),
    split: str = typer.Option("train", "--split", help="Which split to print examples from."),
    prompt_format: str | None = typer.Option(
        None, "--prompt-format", help=f"{PROMPT_FORMAT_HELP}: print each example as rendered in it"
    ),
    base: str | None = typer.Option(
        None, "--base", help="base model whose tokenizer renders the prompt (default: the format's text only)"
    ),
) -> None:
    """Print a task's split sizes, whether it is multiple-choice, and a few formatted examples.

    With --prompt-format (and --base for the tokenizer's chat template) each example is shown as the
    model reads it: the exact prompt text, and the tokens an answer or choice is trained or scored on.
    """
    from moerge.cli.evaluate import at_least
    from moerge.data.loaders import load_task

    at_least(0, n=n)
    at_least(1, limit=limit)
    fmt = prompt_format_option(prompt_format or ("moerge" if base else None))
    tokenizer = _tokenizer(base)
    loaded = load_task(task, seed=seed, limit=limit)
    examples = loaded.split(split)
    table = Table(title=loaded.name)
    for column in ("train", "validation", "test", "multiple-choice"):
        table.add_column(column, justify="right")
    sizes = loaded.sizes()
    table.add_row(
        *(str(sizes[s]) for s in ("train", "validation", "test")),
        "yes" if loaded.is_multiple_choice else "no",
    )
    console.print(table)
    console.print(Text(f"source: {loaded.source}"), soft_wrap=True)
    if loaded.description:
        console.print(Text(loaded.description, style="italic"))
    for i, example in enumerate(examples[:n], start=1):
        console.print(_example_panel(i, example) if fmt is None else _rendered_panel(i, example, fmt, tokenizer))


def _tokenizer(base: str | None) -> Any:
    from moerge.models.loading import load_tokenizer

    return None if base is None else load_tokenizer(base)


def _rendered_panel(index: int, example: Example, fmt: PromptFormat, tokenizer: Any) -> Panel:
    """The example in `fmt`: with a tokenizer, the exact prompt text and each answer's tokens; without
    one, the prompt as the format writes it (the chat template, if any, is the tokenizer's)."""
    from moerge.data.prompts import answer_ids, choice_ids, prompt_ids, uses_chat_template

    title = f"example {index} in prompt format {fmt.name!r}"
    if tokenizer is None:
        user = fmt.user_turn(example.input, example.choices)
        shown = f"user turn (inside the chat template when the tokenizer has one; else {fmt.prompt_text(user)!r}):"
        parts = [Text(shown, style="bold"), Text(user), Text("target: ", style="bold") + Text(example.target)]
        return Panel(Group(*parts), title=title, title_align="left")
    chat = "chat template" if uses_chat_template(tokenizer, fmt) else "no chat template"
    parts = [Text(f"prompt ({chat}):", style="bold"), Text(tokenizer.decode(prompt_ids(tokenizer, example, fmt)))]
    answers = [(c, choice_ids(tokenizer, example, c, fmt)) for c in example.choices or ()]
    label = "scored tokens of each choice" if answers else "answer tokens (trained on)"
    answers = answers or [(example.target, answer_ids(tokenizer, example, example.target, fmt))]
    parts.append(Text(f"{label}:", style="bold"))
    for answer, ids in answers:
        mark = "*" if answer == example.target else " "
        parts.append(Text(f"  {mark} ") + Text(repr(tokenizer.convert_ids_to_tokens(ids))))
    return Panel(Group(*parts), title=title, title_align="left")
