"""Prompt formats: each preset renders exactly its documented tokens, with and without a chat template;
user formats from YAML; bad formats are one line; what a scorer does with a recorded format."""

from __future__ import annotations

import pytest

from helpers import make_tokenizer
from moerge.data.formats import (
    MIXED,
    MOERGE,
    PLAIN,
    RAW,
    UNKNOWN,
    PromptFormat,
    combined,
    load_prompt_format,
    scoring_format,
)
from moerge.data.prompts import answer_ids, choice_ids, encode_for_training, prompt_ids
from moerge.data.task import Example
from moerge.errors import MoergeError

MC = Example("Is 4 even?", "yes", ("yes", "no"))
FREE = Example("2+2=", "4")


@pytest.fixture(scope="module")
def chat():
    return make_tokenizer(chat_template=True)


@pytest.fixture(scope="module")
def bare():
    return make_tokenizer(chat_template=False)


def text(tok, ids: list[int]) -> str:
    return tok.decode(ids)


@pytest.mark.parametrize(
    ("fmt", "prompt", "choice"),
    [
        (
            MOERGE,
            "<|im_start|>user\nIs 4 even?\nOptions:\n- yes\n- no\nAnswer with one of the options.<|im_end|>\n"
            "<|im_start|>assistant\n",
            "yes<|im_end|>",
        ),
        (PLAIN, "<|im_start|>user\nIs 4 even?<|im_end|>\n<|im_start|>assistant\n", "yes<|im_end|>"),
        (RAW, "Is 4 even?", " yes"),
    ],
)
def test_presets_with_a_chat_template(chat, fmt, prompt, choice):
    assert text(chat, prompt_ids(chat, MC, fmt)) == prompt
    assert text(chat, choice_ids(chat, MC, "yes", fmt)) == choice
    trained = encode_for_training(chat, MC, 256, fmt)
    assert text(chat, trained.input_ids) == prompt + choice + ("" if fmt.score_end_token else "<|im_end|>")


@pytest.mark.parametrize(
    ("fmt", "prompt", "choice"),
    [
        (MOERGE, "Is 4 even?\nOptions:\n- yes\n- no\nAnswer with one of the options.\nAnswer:", " yes<|im_end|>"),
        (PLAIN, "Is 4 even?\nAnswer:", " yes<|im_end|>"),
        (RAW, "Is 4 even?", " yes"),
    ],
)
def test_presets_without_a_chat_template(bare, fmt, prompt, choice):
    assert text(bare, prompt_ids(bare, MC, fmt)) == prompt
    assert text(bare, choice_ids(bare, MC, "yes", fmt)) == choice
    assert answer_ids(bare, MC, "yes", fmt)[-1] == bare.eos_token_id  # training always ends the answer


def test_free_form_examples_send_the_input_alone(chat):
    for fmt in (MOERGE, PLAIN):
        assert text(chat, prompt_ids(chat, FREE, fmt)) == "<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n"


def test_system_prompt_default_none_and_text(chat):
    given = PromptFormat(name="s", system="Answer briefly.")
    assert text(chat, prompt_ids(chat, FREE, given)).startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n")
    none = PromptFormat(name="n", system="none")
    assert text(chat, prompt_ids(chat, FREE, none)).startswith("<|im_start|>system\n<|im_end|>\n")
    assert text(chat, prompt_ids(chat, FREE, MOERGE)).startswith("<|im_start|>user\n")


def test_user_format_from_yaml(tmp_path, chat):
    path = tmp_path / "qa.yaml"
    path.write_text('user: "Q: {input}"\nuser_choices: "Q: {input} ({choices})"\nchat: false\ndelimiter: "\\nA: "\n')
    fmt = load_prompt_format(str(path))
    assert fmt.name == "qa"
    assert text(chat, prompt_ids(chat, MC, fmt)) == "Q: Is 4 even? (yes, no)\nAnswer:"
    assert text(chat, choice_ids(chat, MC, "no", fmt)) == "\nA: no<|im_end|>"
    # text put into a template is never read as a placeholder again
    odd = Example("what is {options}?", "x", ("a", "b"))
    assert fmt.user_turn(odd.input, odd.choices) == "Q: what is {options}? (a, b)"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("chatty", r"prompt_format: unknown prompt format 'chatty'; known: moerge, plain, raw, or a \.yaml file"),
        ({"user": "Q: {question}"}, r"user: .*unknown placeholder \{question\}; known: \{input\}"),
        ({"user": "no input here"}, r"user: .*must contain \{input\}"),
        ({"fallback": "{input}"}, r"fallback: .*unknown placeholder \{input\}"),
        ({"chta": True}, r"chta: .*"),
    ],
)
def test_bad_formats_are_one_line(value, message):
    with pytest.raises(MoergeError, match=message) as info:
        load_prompt_format(value)
    assert "\n" not in str(info.value)


def test_bad_yaml_format_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nuser: 'Q: {qestion}'\n")
    with pytest.raises(MoergeError, match=rf"{path}:2: user: .*unknown placeholder"):
        load_prompt_format(str(path))


def test_combined_formats():
    renamed = PLAIN.model_copy(update={"name": "chat-only"})
    assert combined([PLAIN, renamed]) == PLAIN  # same rendering: they agree
    assert combined([PLAIN, MOERGE]) == MIXED
    assert combined([PLAIN, UNKNOWN]) == UNKNOWN
    assert combined([PLAIN, RAW, UNKNOWN]) == MIXED


def test_scoring_format_prefers_override_then_own_then_task():
    assert scoring_format(PLAIN) == (PLAIN, None)
    assert scoring_format(None, RAW) == (RAW, None)  # the base model: the task's format, no note
    assert scoring_format(None) == (MOERGE, None)
    fmt, note = scoring_format(PLAIN, RAW, MOERGE)
    assert fmt == MOERGE and note == "trained with prompt format 'plain', scored in 'moerge'"
    fmt, note = scoring_format(UNKNOWN, RAW)
    assert fmt == RAW and "unknown" in note
    fmt, note = scoring_format(MIXED, PLAIN)
    assert fmt == PLAIN and "different prompt formats" in note
