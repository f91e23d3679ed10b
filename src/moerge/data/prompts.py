"""Turning examples into token ids: the base model's chat template when it has one, and a loss mask
that covers the answer tokens only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moerge.data.task import Example

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


def user_message(example: Example) -> str:
    """The question as the user sees it; multiple-choice examples list their options."""
    if example.choices:
        options = "\n".join(f"- {c}" for c in example.choices)
        return f"{example.input}\nOptions:\n{options}\nAnswer with one of the options."
    return example.input


def prompt_ids(tokenizer: PreTrainedTokenizerBase, example: Example) -> list[int]:
    """Token ids of the prompt, ending where the model's answer starts."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": user_message(example)}]
        return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    return tokenizer(f"{user_message(example)}\nAnswer:", add_special_tokens=True)["input_ids"]


def answer_ids(tokenizer: PreTrainedTokenizerBase, example: Example, answer: str) -> list[int]:
    """Token ids of `answer` as the model should produce it after the prompt, end token included."""
    if tokenizer.chat_template:
        messages = [
            {"role": "user", "content": user_message(example)},
            {"role": "assistant", "content": answer},
        ]
        full = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
        prefix = prompt_ids(tokenizer, example)
        if full[: len(prefix)] == prefix:
            tail = full[len(prefix) :]
            # Keep the answer and the end-of-turn token; drop a trailing newline after it.
            if tokenizer.eos_token_id in tail:
                tail = tail[: tail.index(tokenizer.eos_token_id) + 1]
            return tail
    ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    return [*ids, tokenizer.eos_token_id]


def _ids(rendered: object) -> list[int]:
    """apply_chat_template returns a list or a BatchEncoding depending on the transformers version."""
    if isinstance(rendered, dict) or hasattr(rendered, "keys"):
        rendered = rendered["input_ids"]
    return list(rendered)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


def encode_for_training(tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int) -> Encoded:
    """Prompt + answer with labels masked on the prompt; long prompts lose their start, not the answer."""
    prompt = prompt_ids(tokenizer, example)
    answer = answer_ids(tokenizer, example, example.target)[:max_length]
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
