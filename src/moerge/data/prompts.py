"""Turning examples into token ids in a prompt format (`moerge.data.formats`): the base model's chat
template when the format uses it and the tokenizer has one, and a loss mask that covers the answer
tokens only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moerge.data.formats import PromptFormat
from moerge.data.task import Example

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


def user_message(example: Example, fmt: PromptFormat) -> str:
    """The question as the user sees it, in `fmt` (multiple-choice templates may list the options)."""
    return fmt.user_turn(example.input, example.choices)


def uses_chat_template(tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat) -> bool:
    return fmt.chat and bool(tokenizer.chat_template)


def messages(example: Example, fmt: PromptFormat) -> list[dict[str, str]]:
    """The chat messages of the prompt: the format's system message (if any), then the user turn."""
    system = fmt.system_message()
    head = [] if system is None else [{"role": "system", "content": system}]
    return [*head, {"role": "user", "content": user_message(example, fmt)}]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, example: Example, fmt: PromptFormat) -> list[int]:
    """Token ids of the prompt, ending where the model's answer starts."""
    if uses_chat_template(tokenizer, fmt):
        rendered = tokenizer.apply_chat_template(messages(example, fmt), add_generation_prompt=True, tokenize=True)
        return _ids(rendered)
    return tokenizer(fmt.prompt_text(user_message(example, fmt)), add_special_tokens=True)["input_ids"]


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, turns: list[dict[str, str]], fmt: PromptFormat) -> list[int]:
    """A conversation (OpenAI-style role/content turns) as the prompt of a model trained in `fmt`: the
    last user turn goes through the format's user template; with a chat template every turn is kept
    (the format's system prompt added when the conversation has none); without one, completion-style
    formats have no place for earlier turns, so the prompt is the last user turn alone."""
    last = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=None)
    if last is None:
        raise ValueError("the conversation has no user message")
    turns = [dict(t) for t in turns]
    turns[last]["content"] = fmt.user_turn(turns[last]["content"], None)
    if not uses_chat_template(tokenizer, fmt):
        return tokenizer(fmt.prompt_text(turns[last]["content"]), add_special_tokens=True)["input_ids"]
    system = fmt.system_message()
    if system is not None and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": system})
    return _ids(tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True))


def answer_ids(
    tokenizer: PreTrainedTokenizerBase, example: Example, answer: str, fmt: PromptFormat, *, end: bool = True
) -> list[int]:
    """Token ids of `answer` as the model should produce it after the prompt; with `end`, the
    end-of-turn token (chat) or end token after it. Training always ends answers (so generation
    stops); a scored choice ends when the format says so (`score_end_token`)."""
    if uses_chat_template(tokenizer, fmt):
        turns = [*messages(example, fmt), {"role": "assistant", "content": answer}]
        full = _ids(tokenizer.apply_chat_template(turns, tokenize=True))
        prefix = prompt_ids(tokenizer, example, fmt)
        if full[: len(prefix)] == prefix:
            tail = full[len(prefix) :]
            if tokenizer.eos_token_id in tail:  # the answer, its end-of-turn token; not the newline after
                tail = tail[: tail.index(tokenizer.eos_token_id) + (1 if end else 0)]
            return tail
    ids = tokenizer(fmt.delimiter + answer, add_special_tokens=False)["input_ids"]
    return [*ids, tokenizer.eos_token_id] if end else ids


def choice_ids(tokenizer: PreTrainedTokenizerBase, example: Example, choice: str, fmt: PromptFormat) -> list[int]:
    """The tokens a multiple-choice option is scored on."""
    return answer_ids(tokenizer, example, choice, fmt, end=fmt.score_end_token)


def _ids(rendered: object) -> list[int]:
    """apply_chat_template returns a list or a BatchEncoding depending on the transformers version."""
    if isinstance(rendered, dict) or hasattr(rendered, "keys"):
        rendered = rendered["input_ids"]
    return list(rendered)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


def encode_for_training(
    tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int, fmt: PromptFormat
) -> Encoded:
    """Prompt + answer with labels masked on the prompt; long prompts lose their start, not the answer."""
    prompt = prompt_ids(tokenizer, example, fmt)
    answer = answer_ids(tokenizer, example, example.target, fmt)[:max_length]
    prompt = prompt[max(0, len(prompt) + len(answer) - max_length) :]
    return Encoded(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer)


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, *, left: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists → (ids, attention mask); left padding (the default) so generation continues
    every row, right padding for losses over whole sequences."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def collate(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked out of attention and loss."""
    ids, mask = pad_batch([e.input_ids for e in items], pad_id, left=False)
    labels, _ = pad_batch([e.labels for e in items], IGNORE_INDEX, left=False)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
