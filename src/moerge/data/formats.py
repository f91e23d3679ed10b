"""Prompt formats: how an example becomes the prompt a model reads and the answer it is scored on.

An expert only scores what it can when it is asked the way it was trained: a multiple-choice adapter
trained on the bare question falls to chance when the prompt also lists the options. So a format is a
value — recorded in every expert's `moerge.json`, given by name, YAML file or inline mapping — and
every scorer (eval, compare, routers, serve) renders examples through the format the model was
trained with, unless told otherwise.

Presets (`PROMPT_FORMATS`):
    moerge  the chat template around the input; multiple choice lists the options and asks for one
    plain   the chat template around the input alone (what a plain peft/trl chat script trains on)
    raw     no chat template: the input, then the answer after a space (completion style, lm-eval's
            default); the end token is not part of a scored choice

A user-defined format is the same fields in YAML (any field left out keeps the `moerge` preset's value):

    name: qa
    user: "Question: {input}"
    user_choices: "Question: {input}\\nChoices: {choices}"
    system: You answer with one word.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from moerge.errors import MoergeError
from moerge.registry import Registry
from moerge.yamlconf import read_yaml, validate

USER_PLACEHOLDERS = ("input", "options", "choices")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


class PromptFormat(BaseModel):
    """The fields of a format; the defaults are the `moerge` preset's."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field("custom", min_length=1, description="what reports and moerge.json call the format")
    user: str = Field("{input}", description="user turn of a free-form example; placeholder {input}")
    user_choices: str = Field(
        "{input}\nOptions:\n{options}\nAnswer with one of the options.",
        description="user turn of a multiple-choice example; placeholders {input}, {options} (one "
        "'- choice' a line), {choices} (comma-separated)",
    )
    chat: bool = Field(True, description="wrap the user turn in the tokenizer's chat template when it has one")
    system: str = Field(
        "default",
        description="system prompt: 'default' (the chat template's own), 'none' (an empty system "
        "message) or the text itself",
    )
    fallback: str = Field(
        "{user}\nAnswer:", description="prompt text without a chat template; placeholder {user}: the user turn"
    )
    delimiter: str = Field(" ", description="text between prompt and answer without a chat template")
    score_end_token: bool = Field(True, description="a scored choice includes the end-of-turn (or end) token after it")

    @field_validator("user", "user_choices")
    @classmethod
    def _user_placeholders(cls, template: str) -> str:
        check_placeholders(template, USER_PLACEHOLDERS, required="input")
        return template

    @field_validator("fallback")
    @classmethod
    def _fallback_placeholders(cls, template: str) -> str:
        check_placeholders(template, ("user",), required="user")
        return template

    def user_turn(self, text: str, choices: tuple[str, ...] | None) -> str:
        """The user turn of an example (multiple choice when it has choices)."""
        if not choices:
            return fill(self.user, input=text)
        options = "\n".join(f"- {c}" for c in choices)
        return fill(self.user_choices, input=text, options=options, choices=", ".join(choices))

    def prompt_text(self, user: str) -> str:
        """The prompt without a chat template."""
        return fill(self.fallback, user=user)

    def system_message(self) -> str | None:
        """Content of the system message to send (None: send none, the template's default applies)."""
        return {"default": None, "none": ""}.get(self.system, self.system)

    def same_rendering(self, other: PromptFormat) -> bool:
        """True when both render every example identically (they may differ in name only)."""
        return self.model_dump(exclude={"name"}) == other.model_dump(exclude={"name"})


def check_placeholders(template: str, allowed: tuple[str, ...], *, required: str) -> None:
    """Refuse a `{name}` the template cannot fill, and a template without its `required` placeholder."""
    for name in re.findall(r"\{(\w+)(?![\w}])", template):
        if name in allowed:
            raise ValueError(f"unclosed placeholder {{{name} (write {{{name}}})")
    for name in _PLACEHOLDER.findall(template):
        if name not in allowed:
            known = ", ".join(f"{{{a}}}" for a in allowed)
            raise ValueError(f"unknown placeholder {{{name}}}; known: {known}")
    if f"{{{required}}}" not in template:
        raise ValueError(f"the template must contain {{{required}}}")


def fill(template: str, **values: str) -> str:
    """Replace each `{name}` once (text put in is never read as a placeholder again)."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


PROMPT_FORMATS: Registry[PromptFormat] = Registry("prompt format")
MOERGE = PROMPT_FORMATS.register("moerge", PromptFormat(name="moerge"))
PLAIN = PROMPT_FORMATS.register("plain", PromptFormat(name="plain", user_choices="{input}"))
RAW = PROMPT_FORMATS.register(
    "raw", PromptFormat(name="raw", user_choices="{input}", chat=False, fallback="{user}", score_end_token=False)
)


def load_prompt_format(value: str | dict[str, Any] | PromptFormat, *, field: str = "prompt_format") -> PromptFormat:
    """A preset name, a YAML/JSON file, or a mapping of fields → a format. Errors are one line."""
    if isinstance(value, PromptFormat):
        return value
    if isinstance(value, dict):
        return validate(PromptFormat, value, field)
    if not isinstance(value, str):
        raise MoergeError(f"{field}: expected a preset name, a YAML file or a mapping, got {type(value).__name__}")
    if value in PROMPT_FORMATS:
        return PROMPT_FORMATS.get(value)
    if not _looks_like_file(value):
        known = ", ".join(PROMPT_FORMATS.names())
        raise MoergeError(f"{field}: unknown prompt format {value!r}; known: {known}, or a .yaml file of fields")
    raw, source = read_yaml(value, "prompt format")
    return validate(PromptFormat, {"name": Path(value).stem, **raw}, source)


def _looks_like_file(value: str) -> bool:
    return Path(value).suffix.lower() in (".yaml", ".yml", ".json") or Path(value).is_file()


def _as_format(value: Any) -> Any:
    """Pydantic hook: accept the forms `load_prompt_format` takes; its errors become field errors."""
    try:
        return load_prompt_format(value)
    except MoergeError as exc:
        raise ValueError(str(exc).removeprefix("prompt_format: ")) from None


FormatField = Annotated[PromptFormat, BeforeValidator(_as_format)]
"""A config field holding a format, given as a preset name, a file path or a mapping."""

# ---- what an expert records, and what a scorer does with it ------------------------------------------

UNKNOWN: Literal["unknown"] = "unknown"
MIXED: Literal["mixed"] = "mixed"
Recorded = PromptFormat | Literal["unknown", "mixed"]
"""What a model was trained with: one format, `unknown` (imported without one) or `mixed` (a merge or
router over experts trained with different formats)."""


def combined(formats: list[Recorded]) -> Recorded:
    """The format of something built from several experts: theirs when they agree, else `mixed`
    (`unknown` when any is unknown and the known ones agree)."""
    known = [f for f in formats if isinstance(f, PromptFormat)]
    if any(f == MIXED for f in formats) or any(not f.same_rendering(known[0]) for f in known):
        return MIXED
    if len(known) < len(formats):
        return UNKNOWN
    return known[0] if known else UNKNOWN


def format_name(recorded: Recorded | None) -> str:
    return recorded.name if isinstance(recorded, PromptFormat) else recorded or "none"


def scoring_format(
    recorded: Recorded | None, task_format: PromptFormat | None = None, override: PromptFormat | None = None
) -> tuple[PromptFormat, str | None]:
    """The format to score in, and a note when it is not the one the model was trained with.

    An explicit `override` wins; else the model's own recorded format; else (a base model, an unknown
    or mixed format) the task's format, else `moerge`. `recorded` is None for a model that was not
    trained on prompts (the base).
    """
    own = recorded if isinstance(recorded, PromptFormat) else None
    chosen = override or own or task_format or MOERGE
    if recorded == UNKNOWN:
        return chosen, f"prompt format of the expert is unknown (imported without one): scored in {chosen.name!r}"
    if recorded == MIXED:
        return chosen, f"experts were trained with different prompt formats: scored in {chosen.name!r}"
    if own is not None and not own.same_rendering(chosen):
        return chosen, f"trained with prompt format {own.name!r}, scored in {chosen.name!r}"
    return chosen, None
