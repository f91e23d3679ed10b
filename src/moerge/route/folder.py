"""Router folders (config.json + tensors.safetensors), building them, and loading a routed model.

<router>/config.json           format, router name, options (those the user set), derived (what the
                               build worked out, e.g. the oracle's task → expert map), policy, experts
                               (name + folder), base, prompt_format (what the build rendered the
                               experts' data in) and expert_formats (each expert's recorded format)
<router>/tensors.safetensors   the router's state (prototypes, gates, centroids, ...)

Format 1 folders (written before `derived` existed) kept the build's results inside `options`: the
oracle's `task_to_expert` and GLIDER's chat-written `descriptions`. Both are options of those routers
as well (an explicit task → expert map; the `text` describer's texts, which inference never reads), so
such folders still validate and route exactly as before, with nothing to migrate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moerge.data.formats import PromptFormat, format_name
from moerge.errors import MoergeError
from moerge.library.adapter import short_fingerprint
from moerge.models.loading import check_finite, read_safetensors
from moerge.paths import ROUTER, atomic_directory, check_replaceable, parse_json, write_json_atomic
from moerge.route.policies import Policy, parse_policy
from moerge.route.router import OptionsModel, Router, RouterEnv, build_format, get_router
from moerge.route.routing import Routing
from moerge.route.stacked import StackedModel, attach_experts
from moerge.yamlconf import Source

CONFIG_FILE = "config.json"
TENSORS_FILE = "tensors.safetensors"
FORMAT_VERSION = 2

ExpertsArg = Sequence[str | Path] | Mapping[str, str | Path]
OptionsArg = Mapping[str, Any] | OptionsModel | None


def make_policy(router: str, overrides: Mapping[str, Any] | None = None, source: Source | str = "policy") -> Policy:
    """The router's default policy with the user's non-None overrides on top (errors name `source`)."""
    return get_router(router).default_policy.updated(overrides, source)


def prepare_router(
    handle: StackedModel,
    router: str,
    *,
    tokenizer: Any = None,
    options: OptionsArg = None,
    data: Mapping[str, Any] | None = None,
    library: Any = None,
    prompt_format: PromptFormat | None = None,
) -> Router:
    """Instantiate `router` over the handle's experts and build its state. `options`: a mapping
    (validated by the router's options model) or an instance of that model. The experts' data is
    rendered in `prompt_format` (default: `build_format`, the experts' own when they agree)."""
    cls = get_router(router)
    instance = cls(handle.expert_names, cls.parse_options(options))
    env = RouterEnv(handle, tokenizer, dict(data or {}), library, prompt_format or build_format(handle))
    instance.build(env)
    instance.bind(env)
    return instance


def _load_model(base: Any, tokenizer: Any) -> tuple[Any, Any, str]:
    if isinstance(base, str | Path):
        from moerge.models import load_base

        model, tok = load_base(base)
        return model, tokenizer or tok, str(base)
    return base, tokenizer, str(getattr(base.config, "_name_or_path", ""))


def _fingerprint(model: Any) -> str:
    from moerge.models import fingerprint

    return fingerprint(model)


def build_router(
    router: str,
    experts: ExpertsArg,
    out: str | Path,
    *,
    base: Any,
    tokenizer: Any = None,
    policy: Mapping[str, Any] | None = None,
    options: OptionsArg = None,
    data: Mapping[str, Any] | None = None,
    library: Any = None,
    prompt_format: PromptFormat | None = None,
    overwrite: bool = False,
) -> Path:
    """Build a router over expert folders on `base` (name/path or model) and write the router folder.

    Options and policy are checked before the model is loaded. For errors that point into a file,
    validate the options first with `get_router(router).parse_options(raw, Source(...))` and pass the
    resulting model.
    """
    options = get_router(router).parse_options(options)
    chosen = make_policy(router, policy)
    check_replaceable(out, overwrite=overwrite, kind=ROUTER)  # before minutes of building, not after
    model, tokenizer, base_name = _load_model(base, tokenizer)
    fingerprint = _fingerprint(model)
    handle = attach_experts(model, experts, base_fingerprint=fingerprint)
    try:
        instance = prepare_router(
            handle,
            router,
            tokenizer=tokenizer,
            options=options,
            data=data,
            library=library,
            prompt_format=prompt_format,
        )
        check_finite(instance.tensors(), out, f"the {router} router's state is unusable, nothing was written")
        save_router(out, instance, chosen, handle, {"name_or_path": base_name, "fingerprint": fingerprint}, overwrite)
    finally:
        handle.detach()
    return Path(out)


def save_router(
    out: str | Path,
    router: Router,
    policy: Policy,
    handle: StackedModel,
    base: dict[str, str],
    overwrite: bool = False,
) -> None:
    from safetensors.torch import save_file

    config = {
        "format": FORMAT_VERSION,
        "router": router.name,
        "options": router.options.model_dump(mode="json", exclude_unset=True),
        "derived": router.derived,
        "policy": policy.to_dict(),
        "experts": [{"name": e.name, "path": str(e.folder.resolve())} for e in handle.experts],
        "base": base,
        "prompt_format": router.env.prompt_format.model_dump(mode="json") if router.env else None,
        "expert_formats": {e.name: format_name(e.prompt_format) for e in handle.experts},
    }
    # the shared rule: --overwrite replaces a router folder only (never an expert, a file or a user's folder)
    with atomic_directory(Path(out), overwrite=overwrite, kind=ROUTER) as tmp:
        save_file(router.tensors(), str(tmp / TENSORS_FILE))
        write_json_atomic(tmp / CONFIG_FILE, config)


def read_router_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise MoergeError(f"{path}: not found (is {folder} a router folder made by `moerge route build`?)")
    config = parse_json(path.read_bytes(), path)
    if not isinstance(config, dict):
        raise MoergeError(f"{path}: expected a JSON object, got {type(config).__name__}")
    for key in ("router", "experts", "policy"):
        if key not in config:
            raise MoergeError(f"{path}: field {key!r} missing")
    experts = config["experts"]
    if not isinstance(experts, list) or not experts:
        raise MoergeError(f"{path}: experts: expected a non-empty list of objects with name and path")
    for i, entry in enumerate(experts):
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("path"), str)):
            raise MoergeError(f"{path}: experts.{i}: expected an object with string fields name and path")
    if not isinstance(config.get("base", {}), dict):
        raise MoergeError(f"{path}: base: expected a mapping, got {type(config['base']).__name__}")
    if not isinstance(config.get("derived", {}), dict):
        raise MoergeError(f"{path}: derived: expected a mapping, got {type(config['derived']).__name__}")
    return config


def _saved_router(config: dict[str, Any], path: Path, expert_names: list[str]) -> Router:
    """The router class of config.json with its saved options (validated, errors naming the file) and
    derived values; its tensors are loaded separately."""
    cls = get_router(config["router"], field=f"{path}: router")
    options = cls.parse_options(config.get("options"), Source(str(path)).at("options"))
    return cls(expert_names, options, config.get("derived"))


def load_routed(
    base: Any, router: str | Path, *, tokenizer: Any = None, policy: Mapping[str, Any] | None = None
) -> Any:
    """A transformers model with the router's experts attached and routing on; use forward/generate.

    `base` is a name/path (loaded with `moerge.models.load_base`) or an already loaded model. The
    handle is at `model.moerge_routing`; its `.routing` holds router and policy and gives
    `parameter_counts()`. `policy` overrides the saved policy fields. The saved options and policy
    are checked before the model is touched.
    """
    path = Path(router) / CONFIG_FILE
    config = read_router_config(router)
    experts = {e["name"]: e["path"] for e in config["experts"]}
    instance = _saved_router(config, path, list(experts))
    chosen = parse_policy(config["policy"], Source(str(path)).at("policy")).updated(policy)
    tensors = read_safetensors(Path(router) / TENSORS_FILE)
    model, tokenizer, _ = _load_model(base, tokenizer)
    actual = _fingerprint(model)
    expected = config.get("base", {}).get("fingerprint", "unknown")
    if expected not in ("unknown", actual):
        raise MoergeError(
            f"{path}: base.fingerprint: the router was built on another base ({short_fingerprint(str(expected))})"
            f" than the base model ({short_fingerprint(actual)})"
        )
    handle = attach_experts(model, experts, base_fingerprint=actual)
    instance.load_tensors(tensors)
    instance.bind(RouterEnv(handle, tokenizer))
    Routing(handle, instance, chosen)
    return model
