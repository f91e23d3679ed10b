"""The routers registry and the `Router` base class; the routers themselves are in `moerge.route.routers`,
one file each, registered with `@register_router("<name>")`.

A router scores experts. It may give per-token scores for a layer from that layer's input
(`token_scores`, e.g. Arrow, Phatgoose) and/or per-example scores shared by all layers
(`example_scores`, e.g. oracle, centroid); `moerge.route.routing.Routing` turns them into weights
with a selection policy. Its state is a flat dict of tensors, saved as safetensors in the router folder.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from moerge.errors import MoergeError

if TYPE_CHECKING:
    from moerge.data.task import Example
    from moerge.route.stacked import StackedModel, Step

ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str) -> Callable[[type[Router]], type[Router]]:
    def register(cls: type[Router]) -> type[Router]:
        cls.name = name
        ROUTERS[name] = cls
        return cls

    return register


def get_router(name: str) -> type[Router]:
    _load_all()
    if name not in ROUTERS:
        raise MoergeError(f"router {name!r}: unknown; expected one of {', '.join(sorted(ROUTERS))}")
    return ROUTERS[name]


def router_names() -> list[str]:
    _load_all()
    return sorted(ROUTERS)


def _load_all() -> None:
    """Import every module of `moerge.route.routers` (their decorators fill ROUTERS)."""
    package = importlib.import_module("moerge.route.routers")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


@dataclass
class RouterEnv:
    """What a router may use to build or run: the base with experts attached, its tokenizer, data.

    `data` maps an expert name to its training examples or a `load_task` spec; by default the spec
    is the expert's recorded task source (`moerge.json` → task.source). `library` caches artifacts.
    """

    handle: StackedModel
    tokenizer: Any = None
    data: dict[str, Any] = field(default_factory=dict)
    library: Any = None
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
    """Base class. Subclasses set tensors in `self.state` during `build`, and read them when scoring."""

    name: ClassVar[str] = ""
    default_policy: ClassVar[dict[str, Any]] = {}

    def __init__(self, expert_names: list[str], **options: Any) -> None:
        super().__init__()
        self.expert_names = list(expert_names)
        self.options = options
        self.state = nn.ParameterDict()
        self.env: RouterEnv | None = None
        self._missing: dict[str, torch.Tensor | None] = {}

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
