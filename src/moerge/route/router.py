"""The routers registry and the `Router` base class; the routers themselves are in `moerge.route.routers`,
one file each: the class, registered with `@register_router("<name>")`, and its options model.

A router scores experts. It may give per-token scores for a layer from that layer's input
(`token_scores`, e.g. Arrow, Phatgoose) and/or per-example scores shared by all layers
(`example_scores`, e.g. oracle, centroid); `moerge.route.routing.Routing` turns them into weights
with a selection policy. Three things describe a built router: `options` (what the user chose, a
frozen pydantic model), `derived` (plain JSON values the build worked out, e.g. the oracle's task →
expert map) and its state, a flat dict of tensors; the router folder keeps all three.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from moerge.data.formats import MOERGE, PromptFormat
from moerge.errors import MoergeError
from moerge.registry import Registry
from moerge.route.policies import Policy
from moerge.yamlconf import Source, validate_options

if TYPE_CHECKING:
    from moerge.data.task import Example
    from moerge.route.stacked import StackedModel, Step


def _load_all() -> None:
    """Import every module of `moerge.route.routers` (their decorators fill ROUTERS)."""
    package = importlib.import_module("moerge.route.routers")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


ROUTERS: Registry[type[Router]] = Registry("router", load=_load_all)


def register_router(name: str) -> Callable[[type[Router]], type[Router]]:
    """Class decorator: registers the router under `name` (a second router under a taken name is refused)."""

    def register(cls: type[Router]) -> type[Router]:
        cls.name = name
        return ROUTERS.register(name, cls)

    return register


def get_router(name: str, *, field: str | None = None) -> type[Router]:
    """The router class; an unknown name is one line listing the routers (starting with `field` if given)."""
    return ROUTERS.get(name, field=field)


def router_names() -> list[str]:
    return ROUTERS.names()


class OptionsModel(BaseModel):
    """Base of every router's options model, and the model of routers that take none. Frozen, so a
    build cannot change what the user chose; closed, so a misspelt option is an error, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class RouterEnv:
    """What a router may use to build or run: the base with experts attached, its tokenizer, data.

    `data` maps an expert name to its training examples or a `load_task` spec; by default the spec
    is the expert's recorded task source (`moerge.json` → task.source). `library` caches artifacts.
    `prompt_format` renders those examples (`build_format`: the experts' own when they agree).
    """

    handle: StackedModel
    tokenizer: Any = None
    data: dict[str, Any] = field(default_factory=dict)
    library: Any = None
    prompt_format: PromptFormat = MOERGE
    max_examples: int = 64
    _loaded: dict[str, list[Example]] = field(default_factory=dict, repr=False)

    def examples(self, expert: str) -> list[Example]:
        if expert not in self._loaded:
            self._loaded[expert] = self._load_examples(expert)
        return self._loaded[expert]

    def _load_examples(self, expert: str) -> list[Example]:
        given = self.data.get(expert)
        if given is None:
            given = _recorded_task_spec(self.handle, expert)
        if isinstance(given, str):
            from moerge.data import load_task

            given = load_task(given).train
        if not given:
            raise MoergeError(f"expert {expert!r}: no training examples to build the router from")
        return list(given)[: self.max_examples]


def build_format(handle: StackedModel) -> PromptFormat:
    """The format a router renders its experts' data in: the one they were trained with when they
    agree; moerge's when they disagree or one is unknown (the router records which it was)."""
    recorded = handle.prompt_format
    return recorded if isinstance(recorded, PromptFormat) else MOERGE


def _recorded_task_spec(handle: StackedModel, expert: str) -> str:
    from moerge.library.expert import read_expert_meta

    folder = handle.experts[handle.expert_names.index(expert)].folder
    if not (folder / "moerge.json").is_file():
        raise MoergeError(f"expert {expert!r} ({folder}): no moerge.json recording its task; pass its data")
    return read_expert_meta(folder).task.source


def module_key(module: str) -> str:
    """Module names contain dots, which nn.ParameterDict keys may not."""
    return module.replace(".", "/")


class Router(nn.Module):
    """Base class. Subclasses set `options_model`, set tensors in `self.state` during `build` (and JSON
    values in `self.derived` when the build works something out), and read them when scoring."""

    name: ClassVar[str] = ""
    options_model: ClassVar[type[OptionsModel]] = OptionsModel
    default_policy: ClassVar[Policy] = Policy()

    def __init__(
        self, expert_names: list[str], options: OptionsModel | None = None, derived: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__()
        if options is None:
            options = self.options_model()
        if type(options) is not self.options_model:  # a subclass would carry options this router ignores
            raise TypeError(f"{type(self).__name__} takes {self.options_model.__name__}, not {type(options).__name__}")
        self.expert_names = list(expert_names)
        self.options = options
        self.derived: dict[str, Any] = dict(derived or {})
        self.state = nn.ParameterDict()
        self.env: RouterEnv | None = None
        self._missing: dict[str, torch.Tensor | None] = {}

    @classmethod
    def parse_options(
        cls, raw: Mapping[str, Any] | OptionsModel | None, source: Source | str = "options"
    ) -> OptionsModel:
        """The router's options from user input (an options model instance passes through); an option
        the router does not take is refused with the list of those it does, naming `source`."""
        if type(raw) is cls.options_model:
            return raw
        raw = dict(raw) if isinstance(raw, Mapping) else raw
        return validate_options(cls.options_model, raw, source, f"router {cls.name!r}")

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    def build(self, env: RouterEnv) -> None:
        """Compute the router's state (prototypes, gates, centroids...) from the experts and their data."""

    def bind(self, env: RouterEnv) -> None:
        """Attach the runtime environment (the routed model and tokenizer) before inference."""
        self.env = env

    def token_scores(self, module: str, x: torch.Tensor) -> torch.Tensor | None:
        """Scores [b, s, K] for the tokens entering `module`, or None for example-level routers."""
        return None

    def example_scores(self, step: Step) -> torch.Tensor | None:
        """Scores [b, K] per example of the current prompt, shared by all layers, or None."""
        return None

    def set_tensor(self, key: str, value: torch.Tensor, *, trainable: bool = False) -> None:
        self.state[key] = nn.Parameter(value.detach().clone(), requires_grad=trainable)
        self._missing.clear()

    def set_present(self, module: str, present: torch.Tensor) -> None:
        """Record which experts adapt `module` (token routers mask the others with `mask_missing`)."""
        self.set_tensor(module_key(module) + "#present", present.clone())

    def mask_missing(self, module: str, scores: torch.Tensor) -> torch.Tensor:
        """-inf for experts that do not adapt `module`: they would take top-k slots and do nothing.

        The mask is cached per module (None when all experts are present): this runs per layer and token.
        """
        if module not in self._missing:
            missing = ~self.state[module_key(module) + "#present"].bool()
            self._missing[module] = missing if bool(missing.any()) else None
        missing = self._missing[module]
        return scores if missing is None else scores.masked_fill(missing, float("-inf"))

    def tensor(self, key: str) -> torch.Tensor:
        return self.state[key]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous() for k, v in self.state.items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, value in tensors.items():
            self.set_tensor(key, value)
