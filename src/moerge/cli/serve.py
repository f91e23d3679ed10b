"""`moerge serve`: the base model, a library's experts and routers behind an OpenAI-compatible API."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from moerge.cli.help import key_values
from moerge.errors import MoergeError
from moerge.models.loading import set_load_defaults
from moerge.models.precision import DEVICE_HELP, DEVICE_MAP_HELP, DTYPE_HELP
from moerge.progress import output_console

console = output_console(stderr=True)


def serve(
    library: str | None = typer.Option(None, "--library", "-l", help="expert library to serve (every expert by name)"),
    base: str | None = typer.Option(None, "--base", help="base model (default: the library's experts' recorded base)"),
    router: list[str] | None = typer.Option(
        None, "--router", help="router folder to serve, as NAME=FOLDER or FOLDER (named by the folder); repeatable"
    ),
    auto: str | None = typer.Option(None, "--auto", help="the router `model: auto` uses (default: the first --router)"),
    from_compare: Path | None = typer.Option(
        None, "--from-compare", help="a `moerge compare --out` folder: serve its best router (held-out) as `auto`"
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, "--port", help="port to listen on"),
    api_key_env: str | None = typer.Option(
        None, "--api-key-env", help="environment variable holding the API key clients must send as a Bearer token"
    ),
    max_tokens: int = typer.Option(512, "--max-tokens", help="cap on any request's max_tokens"),
    max_queue: int = typer.Option(64, "--max-queue", help="requests queued or running before new ones get 429"),
    max_loaded: int = typer.Option(4, "--max-loaded-experts", help="models kept loaded (least recently used go)"),
    max_memory_gb: float | None = typer.Option(
        None,
        "--max-memory-gb",
        help="memory budget of the loaded models (least recently used go; a model bigger than it gets 503)",
    ),
    upstream: str | None = typer.Option(
        None,
        "--upstream",
        help="proxy mode: forward generation to this OpenAI-compatible engine (…/v1) serving the experts by name",
    ),
    upstream_key_env: str | None = typer.Option(
        None, "--upstream-key-env", help="environment variable holding the upstream engine's API key"
    ),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    device_map: str | None = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
    export_vllm: bool = typer.Option(
        False, "--export-vllm", help="print the `vllm serve` command serving the library's experts under their names"
    ),
) -> None:
    """Serve base, experts and routers with the OpenAI API: POST /v1/chat/completions and /v1/completions
    (streaming too), GET /v1/models, /health and /metrics (Prometheus).

    The request's `model` picks what answers: `base`, an expert of the library by name, a router by
    name, or `auto` (the default router). Chat messages are rendered in the prompt format the model
    was trained with; routed answers carry the experts' weights in a `moerge` field.
    """
    import uvicorn

    from moerge.cli.evaluate import at_least
    from moerge.serve import ModelPool, create_app

    at_least(1, port=port, max_tokens=max_tokens, max_queue=max_queue, max_loaded_experts=max_loaded)
    if max_memory_gb is not None and not max_memory_gb > 0:
        raise MoergeError(f"--max-memory-gb: expected a number of GB above 0, got {max_memory_gb:g}")
    set_load_defaults(dtype=dtype, device=device, device_map=device_map)
    routers = _routers(router or [])
    if from_compare is not None:
        from moerge.recipes.compare import best_router

        name, folder = best_router(from_compare)
        routers[name] = folder
        auto = auto or name
    if auto is not None and auto not in routers:
        raise MoergeError(f"--auto: {auto!r} is not a served router (served: {', '.join(routers) or 'none'})")
    lib = _library(library)
    if export_vllm:
        _print_vllm(lib, base or _recorded_base(lib, routers))
        return
    pool = ModelPool(
        base=base or _recorded_base(lib, routers),
        library=lib,
        routers=routers,
        auto=auto or next(iter(routers), None),
        max_loaded=max_loaded,
        max_memory_gb=max_memory_gb,
    )
    proxy = None
    if upstream is not None:
        from moerge.serve.proxy import Upstream, check_example_level

        check_example_level(pool)
        proxy = Upstream(upstream, pool, _api_key(upstream_key_env, "--upstream-key-env"))
    key = _api_key(api_key_env)
    app = create_app(pool, api_key=key, max_tokens=max_tokens, max_queue=max_queue, upstream=proxy)
    names = pool.names()
    shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
    mode = f"generation by {upstream}" if upstream else f"base {pool.base}"
    console.print(f"moerge serve: http://{host}:{port}/v1 ({mode}); models: {shown}", markup=False)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _print_vllm(library, base: str) -> None:
    from moerge.serve.vllm import vllm_command

    if library is None:
        raise MoergeError("--export-vllm: needs --library (the experts to serve)")
    command, skipped = vllm_command(library, base)
    for line in skipped:
        console.print(f"left out: {line}", markup=False)
    print(command)


def _routers(given: list[str]) -> dict[str, Path]:
    named = {value: value for value in given if "=" not in value}
    pairs = {**key_values([v for v in given if "=" in v], "--router"), **named}
    routers = {}
    for name, folder in pairs.items():
        path = Path(folder)
        if not (path / "config.json").is_file():
            raise MoergeError(f"--router: {folder}: not a router folder (no config.json; see `moerge route build`)")
        routers[Path(name).name if name == folder else name] = path
    return routers


def _library(location: str | None):
    if location is None:
        return None
    from moerge.library import ExpertLibrary

    return ExpertLibrary(location)


def _recorded_base(library, routers: dict[str, Path]) -> str:
    """The base the served experts were trained on, as they record it."""
    from moerge.route import read_router_config

    for name in library.names() if library is not None else []:
        return library.meta(name).base.name_or_path
    for folder in routers.values():
        recorded = read_router_config(folder).get("base", {}).get("name_or_path")
        if recorded:
            return recorded
    raise MoergeError("--base: missing (no library expert or router records its base)")


def _api_key(variable: str | None, flag: str = "--api-key-env") -> str | None:
    if variable is None:
        return None
    key = os.environ.get(variable, "")
    if not key:
        raise MoergeError(f"{flag}: environment variable {variable} is not set or empty")
    return key
