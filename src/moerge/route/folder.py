"""Router folders (config.json + tensors.safetensors), building them, and loading a routed model.

<router>/config.json           router name, options, policy, experts (name + folder), base
<router>/tensors.safetensors   the router's state (prototypes, gates, centroids, ...)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moerge.errors import MoergeError
from moerge.paths import atomic_directory, parse_json, write_json_atomic
from moerge.route.policies import Policy
from moerge.route.router import Router, RouterEnv, get_router
from moerge.route.routing import Routing
from moerge.route.stacked import StackedModel, attach_experts

CONFIG_FILE = "config.json"
TENSORS_FILE = "tensors.safetensors"
FORMAT_VERSION = 1

ExpertsArg = Sequence[str | Path] | Mapping[str, str | Path]


def make_policy(router: str, overrides: Mapping[str, Any] | None = None) -> Policy:
    """The router's default policy with the user's non-None overrides on top."""
    values = {
        **get_router(router).default_policy,
        **{k: v for k, v in (overrides or {}).items() if v is not None},
    }
    try:
        return Policy(**values)
    except TypeError as exc:
        raise MoergeError(f"policy: {exc}") from None


def prepare_router(
    handle: StackedModel,
    router: str,
    *,
    tokenizer: Any = None,
    options: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    library: Any = None,
) -> Router:
    """Instantiate `router` over the handle's experts and build its state."""
    instance = get_router(router)(handle.expert_names, **dict(options or {}))
    env = RouterEnv(handle, tokenizer, dict(data or {}), library)
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
    options: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    library: Any = None,
    overwrite: bool = False,
) -> Path:
    """Build a router over expert folders on `base` (name/path or model) and write the router folder."""
    chosen = make_policy(router, policy)
    model, tokenizer, base_name = _load_model(base, tokenizer)
    fingerprint = _fingerprint(model)
    handle = attach_experts(model, experts)
    try:
        instance = prepare_router(handle, router, tokenizer=tokenizer, options=options, data=data, library=library)
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
        "options": router.options,
        "policy": policy.to_dict(),
        "experts": [{"name": e.name, "path": str(e.folder.resolve())} for e in handle.experts],
        "base": base,
    }
    with atomic_directory(Path(out), overwrite=overwrite) as tmp:
        save_file(router.tensors(), str(tmp / TENSORS_FILE))
        write_json_atomic(tmp / CONFIG_FILE, config)


def read_router_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise MoergeError(f"{path}: not found (is {folder} a router folder made by `moerge route build`?)")
    config = parse_json(path.read_bytes(), path)
    for key in ("router", "experts", "policy"):
        if key not in config:
            raise MoergeError(f"{path}: field {key!r} missing")
    return config


def load_routed(
    base: Any, router: str | Path, *, tokenizer: Any = None, policy: Mapping[str, Any] | None = None
) -> Any:
    """A transformers model with the router's experts attached and routing on; use forward/generate.

    `base` is a name/path (loaded with `moerge.models.load_base`) or an already loaded model. The
    handle is at `model.moerge_routing` (its `.routing` holds router and policy). `policy` overrides
    the saved policy fields.
    """
    from safetensors.torch import load_file

    config = read_router_config(router)
    model, tokenizer, _ = _load_model(base, tokenizer)
    expected = config.get("base", {}).get("fingerprint", "unknown")
    if expected != "unknown" and _fingerprint(model) != expected:
        raise MoergeError(f"{router}: was built for another base model (fingerprint {expected[:12]}...)")
    experts = {e["name"]: e["path"] for e in config["experts"]}
    handle = attach_experts(model, experts)
    instance = get_router(config["router"])(handle.expert_names, **config.get("options", {}))
    instance.load_tensors(load_file(str(Path(router) / TENSORS_FILE)))
    instance.bind(RouterEnv(handle, tokenizer))
    Routing(handle, instance, Policy(**{**config["policy"], **(policy or {})}))
    return model
