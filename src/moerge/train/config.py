"""Training settings: one pydantic model shared by CLI options and YAML files.

A training file is either one `TrainConfig` mapping, or a mapping with a `stages:` list (a
`StagedConfig`); each stage is a `TrainConfig` built from the file's top-level settings overridden by
the stage's own keys.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator, model_validator

from moerge.data.formats import MOERGE, FormatField, PromptFormat
from moerge.models.precision import DtypeName, QuantizeName
from moerge.train.methods import METHODS, get_method
from moerge.train.methods.base import DEFAULT_TARGETS, NoOptions
from moerge.yamlconf import CommaList, Source, an_option_of, read_yaml, validate

# Settings every fingerprint has hashed, default or not, since the first release. Any other setting,
# including the ones added since and every future one, enters the hash only when it differs from its
# default: adding a setting never changes the hash of the experts trained before it existed.
ALWAYS_HASHED = (
    "base", "task", "method", "rank", "alpha", "dropout", "target_modules", "lr", "steps", "epochs",
    "batch_size", "max_length", "seed", "limit", "warmup_ratio", "weight_decay",
)  # fmt: skip
NOT_HASHED = ("name", "out", "checkpoint_every", "eval_split", "eval_limit", "gradient_checkpointing")
# gradient_checkpointing recomputes the same activations (the gradients are equal): a run may switch it
# on or off when resuming, and a library expert stays up to date when a recipe adds it.
# In the first release every method had the LoRA settings; a method without them hashes their values of
# then, so experts of those methods (full, hft, ia3, ...) keep their hashes too.
FIRST_RELEASE_DEFAULTS = {"rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": DEFAULT_TARGETS}


class TrainConfig(BaseModel):
    """Everything that decides what an expert (or one stage of it) becomes. Unknown keys are errors.

    `method` names a training method; its own options (rank, alpha, ... — each method's options model,
    see `moerge.train.methods`) live in `method_options`. In YAML and on the command line they may be
    given flat (`method: lora`, `rank: 8`) or nested (`method: {name: corda, corda_mode: kpm}`); an
    option the method does not take is refused with the method's accepted options.
    """

    model_config = ConfigDict(extra="forbid")

    base: str
    task: str | None = Field(None, description="task spec to train on (finetune and self_train stages)")
    method: str = Field("lora", description="training method (see `moerge train --help`)")
    method_options: SerializeAsAny[BaseModel] = Field(default_factory=NoOptions, description="the method's options")
    name: str | None = Field(None, description="expert name (a stage's name inside `stages:`)")
    out: str | None = Field(None, description="expert folder to write (a recipe may set it)")
    lr: float | None = Field(None, gt=0, description="learning rate; None picks the method's default")
    steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    epochs: float = Field(1.0, gt=0, description="passes over the training split")
    batch_size: int = Field(
        8, ge=1, description="examples per forward pass (an optimizer step takes grad_accum of them)"
    )
    max_length: int = Field(256, ge=8, description="max tokens per example (long prompts lose their start)")
    seed: int = Field(0, description="seed for splits, initialisation and data order")
    limit: int | None = Field(None, ge=1, description="cap on each task's examples (all splits)")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="share of the steps spent warming the learning rate up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    checkpoint_every: int = Field(20, ge=1, description="save a resumable checkpoint every N steps")
    eval_split: str | None = Field("test", description="split scored after training (none: skip)")
    eval_limit: int | None = Field(None, ge=1, description="score at most this many examples")
    prompt_format: FormatField | None = Field(
        None, description="how examples become prompts: moerge, plain, raw, a YAML file or a mapping (default: moerge)"
    )
    # Precision and memory: real-size bases on one GPU.
    dtype: DtypeName = Field(
        "auto",
        description="compute dtype: auto (bf16 on a CUDA GPU that has it, else fp32), bf16, fp16 (CUDA only), "
        "fp32; the frozen base is held in it, trainable weights and optimizer state stay fp32",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute each layer's activations in the backward pass: far less memory, ~30% more time"
    )
    grad_accum: int = Field(
        1, ge=1, description="micro-batches accumulated per optimizer step (effective batch = batch_size × grad_accum)"
    )
    quantize: QuantizeName | None = Field(
        None, description="hold the frozen base in 4bit (NF4) or 8bit (bitsandbytes, CUDA): QLoRA; adapter methods only"
    )
    # Multi-task mixing.
    tasks: CommaList | None = Field(None, description="several task specs trained together (instead of `task`)")
    mixing: Literal["concat", "proportional", "temperature", "weights"] = Field(
        "concat",
        description="concat: shuffle all examples together; proportional: sample tasks by size; "
        "temperature: by size^(1/temperature); weights: by `weights`",
    )
    temperature: float = Field(2.0, gt=0, description="T of temperature mixing (1 = proportional, large = uniform)")
    weights: list[float] | None = Field(None, description="one sampling weight per entry of `tasks` (mixing: weights)")
    per_task_loss: bool = Field(False, description="average the loss per task inside a batch, then over tasks")
    # Stages.
    type: Literal["finetune", "pretrain", "self_train", "dpo", "grpo"] = Field(
        "finetune",
        description="finetune on a task; pretrain: LM loss on raw `text`; self_train: pseudo labels; "
        "dpo: preference pairs (`preferences`); grpo: sampled answers rewarded by the task's scorer or `reward`",
    )
    text: CommaList | None = Field(None, description="raw text files (.txt, or .jsonl with a `text` field)")
    start: Literal["continue", "merge"] = Field(
        "continue",
        description="how a stage starts from the previous one: keep training its adapter, or merge it first",
    )
    unlabelled: str | None = Field(None, description="self_train pool: .txt (one input a line), .jsonl or a task")
    confidence: float = Field(0.0, ge=0, le=1, description="self_train: keep pseudo labels at least this confident")
    keep_top: float | None = Field(
        None, gt=0, le=1, description="self_train: then keep only this fraction of the pool, most confident first"
    )
    pseudo_steps: int | None = Field(None, ge=1, description="self_train: steps on the pseudo labels (default: epochs)")
    # Preference optimisation (type: dpo).
    preferences: str | None = Field(
        None, description="dpo: preference pairs, .jsonl or .csv with `prompt`, `chosen`, `rejected`"
    )
    beta: float = Field(
        0.1,
        ge=0,
        description="dpo, grpo: strength of the pull towards the reference (the stage's start; grpo: KL weight)",
    )
    loss: Literal["sigmoid", "ipo"] = Field("sigmoid", description="dpo: sigmoid (DPO) or ipo (squared margin)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo: assumed share of flipped preference labels")
    # Reinforcement with verifiable rewards (type: grpo).
    reward: str | None = Field(
        None,
        description="grpo: reward function `module:function(completion, example) -> float` (default: task scorer)",
    )
    group_size: int = Field(4, ge=2, description="grpo: completions sampled per prompt (advantages are within a group)")
    max_new_tokens: int = Field(32, ge=1, description="grpo: longest sampled completion")
    sampling_temperature: float = Field(1.0, gt=0, description="grpo: sampling temperature of the completions")
    clip: float = Field(0.2, gt=0, lt=1, description="grpo: the policy ratio is clipped to [1 − clip, 1 + clip]")

    @model_validator(mode="before")
    @classmethod
    def _typed_method_options(cls, raw: Any) -> Any:
        """Gather the method's options (flat keys, `method: {name, ...}`, `method_options`) into its model."""
        if not isinstance(raw, dict) or isinstance(raw.get("method_options"), BaseModel):
            return raw
        raw, given = split_method_options(raw, set(cls.model_fields))
        if isinstance(raw["method"], str):  # else the `method` field reports its own type error
            raw["method_options"] = get_method(raw["method"]).options.model_validate(given)
        return raw

    @field_validator("prompt_format")
    @classmethod
    def _moerge_is_default(cls, fmt: PromptFormat | None) -> PromptFormat | None:
        """`moerge` said explicitly is the default: the same expert, the same fingerprint."""
        return None if fmt is not None and fmt.same_rendering(MOERGE) and fmt.name == MOERGE.name else fmt

    @model_validator(mode="after")
    def _data_matches_type(self) -> TrainConfig:
        if self.type == "pretrain":
            if not self.text:
                raise ValueError("a pretrain stage needs `text`: raw text files (.txt or .jsonl with `text`)")
        elif self.type == "dpo":
            if not self.preferences:
                raise ValueError("a dpo stage needs `preferences`: a .jsonl or .csv of prompt, chosen, rejected")
            if self.beta <= 0:
                raise ValueError("beta: a dpo stage needs beta > 0")
            if self.task is not None and self.tasks is not None:
                raise ValueError("a dpo stage scores `task` or `tasks` (give one), it trains on `preferences`")
        elif (self.task is None) == (self.tasks is None):
            raise ValueError("give exactly one of `task` (one task) or `tasks` (a list, mixed by `mixing`)")
        if self.tasks is not None and not self.tasks:
            raise ValueError("`tasks` is empty")
        if self.mixing == "weights" and (self.weights is None or len(self.weights) != len(self.tasks or [])):
            raise ValueError("mixing: weights needs `weights` with one positive number per entry of `tasks`")
        if self.weights is not None and (min(self.weights) < 0 or sum(self.weights) <= 0):
            raise ValueError("`weights` must be non-negative with a positive sum")
        if self.quantize is not None:
            _check_quantizable(self.method, self.quantize)
        if self.type == "grpo" and self.task is None:
            raise ValueError("a grpo stage needs `task`: its prompts are sampled and its answers rewarded")
        if self.type == "self_train" and not self.unlabelled:
            raise ValueError("a self_train stage needs `unlabelled`: a pool of inputs (.txt, .jsonl or a task)")
        return self

    @property
    def format(self) -> PromptFormat:
        """The prompt format the examples are rendered in."""
        return self.prompt_format or MOERGE

    @property
    def task_specs(self) -> list[str]:
        """The task specs this config trains on (empty for pretraining)."""
        return list(self.tasks) if self.tasks is not None else [self.task] if self.task else []

    def settings(self) -> dict[str, Any]:
        """Every setting as one flat mapping: the run's, the method's name and the method's options."""
        flat = self.model_dump(mode="json", exclude={"method_options"})
        return {**flat, **self.method_options.model_dump(mode="json")}

    def fingerprint(self) -> str:
        """Hash of the settings that change the result (see ALWAYS_HASHED), to refuse resuming with
        different ones and to know when a library's expert is up to date."""
        defaults = {**_field_defaults(TrainConfig), **_field_defaults(type(self.method_options))}
        settings = {**FIRST_RELEASE_DEFAULTS, **self.settings()}
        keep = {
            key: value
            for key, value in settings.items()
            if key not in NOT_HASHED and (key in ALWAYS_HASHED or value != defaults.get(key))
        }
        if keep.get("task") is None:
            keep.pop("task", None)
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _check_quantizable(method: str, quantize: str) -> None:
    """A quantised base stays frozen and unmodified: full-weight methods and the inits that rewrite the
    base (W − B0·A0) cannot run on it."""
    from moerge.train.methods.builtin import ResidualInitMethod

    trained = METHODS.get(method) if method in METHODS else None
    if trained is not None and (trained.kind == "full" or isinstance(trained, ResidualInitMethod)):
        what = "trains the base's weights" if trained.kind == "full" else "rewrites the base's weights at init"
        raise ValueError(f"quantize: {quantize} needs a method that leaves the base untouched; {method!r} {what}")


def _field_defaults(model: type[BaseModel]) -> dict[str, Any]:
    """Each field's default as JSON data (what `settings()` would show for it)."""
    out = {}
    for name, info in model.model_fields.items():
        if not info.is_required():
            default = info.get_default(call_default_factory=True)
            out[name] = default.model_dump(mode="json") if isinstance(default, BaseModel) else default
    return out


def split_method_options(raw: dict[str, Any], run_fields: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run settings with `method` as a name, the method's options) from any of the accepted forms:
    flat keys that are not run settings, `method: {name: ..., <options>}`, or `method_options: {...}`."""
    raw = dict(raw)
    given = raw.pop("method_options", None) or {}
    given = dict(given) if isinstance(given, dict) else {"method_options": given}
    method = raw.get("method", "lora")
    if isinstance(method, dict):
        given.update({k: v for k, v in method.items() if k != "name"})
        method = method.get("name", "lora")
    raw["method"] = method
    for key in [k for k in raw if k not in run_fields]:
        given[key] = raw.pop(key)
    return raw, given


class StagedConfig(BaseModel):
    """Several training stages run in order, each starting from the previous one's result."""

    model_config = ConfigDict(extra="forbid")
    base: str = Field(min_length=1)
    out: str | None = None
    name: str | None = None
    stages: list[TrainConfig] = Field(min_length=1)

    def fingerprint(self) -> str:
        parts = [stage.fingerprint() + stage.start for stage in self.stages]
        return hashlib.sha256(json.dumps([self.base, parts]).encode()).hexdigest()[:16]


def load_train_config(path: Path | str, overrides: dict[str, Any] | None = None) -> TrainConfig | StagedConfig:
    """Read a training YAML (one config, or one with `stages:`); command-line options given explicitly
    (not None) win over the file's top-level settings."""
    raw, source = read_yaml(path, "training recipe")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "stages" in raw:
        return staged_from_dict(raw, source, overrides=given)
    return config_from_dict({**raw, **given}, source)


def staged_from_dict(
    raw: dict[str, Any], source: Source | str = "recipe", *, overrides: dict[str, Any] | None = None
) -> StagedConfig:
    """Build each stage from the top-level settings plus its own keys (then `overrides`, e.g. CLI options).

    A stage's seed defaults to the recipe's seed plus its index, so seeded choices (HFT's frozen
    half, data order) differ from stage to stage. A top-level or command-line method option (say
    `rank`) applies to the stages whose method takes it; one that no stage's method takes is refused.
    """
    source = Source(source) if isinstance(source, str) else source
    overrides = dict(overrides or {})
    raw = {**raw, **{k: overrides.pop(k) for k in ("base", "seed", "out", "name") if k in overrides}}
    stages = raw.pop("stages")
    if not isinstance(stages, list) or not stages:
        raise source.error(["stages"], "a non-empty list of stage mappings is expected")
    top = {k: raw.pop(k) for k in ("out", "name") if k in raw}
    built = []
    for index, stage in enumerate(stages):
        where = source.at("stages", index)
        if not isinstance(stage, dict):
            raise where.error([], "a mapping of settings is expected")
        if "base" in stage:
            raise where.error(["base"], "`base` is set once, at the top of the recipe")
        inherited = {**raw, "seed": raw.get("seed", 0) + index}
        method = _method_name({**inherited, **stage, **overrides}.get("method", "lora"))
        merged = {**_for_method(inherited, method), **stage, **_for_method(overrides, method)}
        merged.setdefault("name", f"stage{index + 1}")
        for key, other in (("task", "tasks"), ("tasks", "task")):
            if other not in stage and (key in stage or merged.get("type") == "pretrain"):
                merged.pop(other, None)  # a stage's own data replaces the recipe's default
        built.append(config_from_dict(merged, where))
    _refuse_unused_options(overrides, built)
    return validate(StagedConfig, {"base": raw.get("base", ""), "stages": built, **top}, source)


def _method_name(method: Any) -> Any:
    return method.get("name", "lora") if isinstance(method, dict) else method


def _for_method(settings: dict[str, Any], method: Any) -> dict[str, Any]:
    """`settings` without the options of other methods that `method` does not take. A key that is no
    method's option stays, so a misspelt setting is still refused."""
    if method not in METHODS:
        return settings
    takes = set(METHODS.get(method).options.model_fields)
    others = {option for _, m in METHODS.items() for option in m.options.model_fields} - takes
    return {k: v for k, v in settings.items() if k not in others or k in TrainConfig.model_fields}


def _refuse_unused_options(overrides: dict[str, Any], stages: list[TrainConfig]) -> None:
    """A command-line method option that no stage takes would silently do nothing: refuse it."""
    taken = {option for stage in stages for option in type(stage.method_options).model_fields}
    for key in overrides:
        if key not in TrainConfig.model_fields and key not in taken:
            methods = sorted({stage.method for stage in stages})
            raise Source("command-line options").error([key], f"no stage's method ({', '.join(methods)}) takes it")


def config_from_dict(raw: dict[str, Any], source: Source | str = "options") -> TrainConfig:
    """A `TrainConfig` from a mapping (a YAML file's or command-line options), errors as `file:line: field:`.
    A key that is neither a training setting nor an option of the chosen method is refused with both lists."""
    source = Source(source) if isinstance(source, str) else source
    run, given = split_method_options(raw, set(TrainConfig.model_fields))
    if not isinstance(run["method"], str):
        raise source.error(["method"], "expected a method name, or a mapping with `name` and its options")
    if run["method"] not in METHODS:
        raise source.error(
            ["method"], f"unknown training method {run['method']!r}; known: {', '.join(METHODS.names())}"
        )
    options = METHODS.get(run["method"]).options
    unknown = sorted(set(given) - set(options.model_fields), key=str)
    if unknown:
        what = f"method {run['method']!r}"
        raise source.error([unknown[0]], f"not a training setting, nor {an_option_of(what, options)}")
    return validate(TrainConfig, raw, source)
