"""Proxy mode: moerge routes, an existing engine generates.

`moerge serve --upstream URL` runs no model for generation: each request goes to an OpenAI-compatible
engine that serves the library's experts as named LoRA adapters (vLLM with `--enable-lora
--lora-modules`, see `--export-vllm`; SGLang; LoRAX; another moerge server). For `model: auto` (or a
served router's name) moerge first picks the expert with an example-level router run locally on the
prompt, then forwards the request under that expert's name; every other name is forwarded as is.
Token-level routers mix experts inside every layer, which no such engine does: they need the
in-process engine, and are refused here.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

from moerge.errors import MoergeError
from moerge.serve.models import AUTO, ModelPool
from moerge.serve.schemas import ServeError

_END = object()


def check_example_level(pool: ModelPool) -> None:
    """Refuse, before serving, a router that decides per token."""
    from moerge.route import read_router_config

    for name, folder in pool.routers.items():
        granularity = read_router_config(folder).get("policy", {}).get("granularity")
        if granularity == "token":
            raise MoergeError(
                f"--router {name}: routes per token, which an upstream engine cannot do; serve it without "
                "--upstream, or build an example-level router (e.g. centroid, or --granularity example)"
            )


class Upstream:
    """An OpenAI-compatible engine at `url` (…/v1), optionally with a key; one router lock for the
    local decisions (the routed model is shared)."""

    def __init__(self, url: str, pool: ModelPool, key: str | None = None, timeout: float = 600) -> None:
        self.url, self.pool, self.key, self.timeout = url.rstrip("/"), pool, key, timeout
        self._lock = threading.Lock()

    def target(self, body: Any) -> tuple[str, dict[str, float] | None]:
        """(the model name to forward to, the routing weights when moerge chose it)."""
        router = self.pool.auto if body.model == AUTO else body.model if body.model in self.pool.routers else None
        if router is None:
            return body.model, None
        with self._lock:
            weights = self._decide(router, body)
        return max(weights, key=weights.get), weights

    def _decide(self, router: str, body: Any) -> dict[str, float]:
        """The router's per-example weights for the request's prompt (one forward of the prompt)."""
        import torch

        from moerge.serve.engine import request_prompt_ids, routing_summary

        loaded = self.pool.get(router)
        ids = request_prompt_ids(body, loaded.tokenizer, loaded.prompt_format)
        routing = loaded.model.moerge_routing.routing
        routing.start_recording()
        with torch.no_grad():
            loaded.model(input_ids=torch.tensor([ids]))
        return routing_summary(routing)

    def _request(self, path: str, payload: dict[str, Any]) -> urllib.request.Request:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.key}"} if self.key else {})}
        return urllib.request.Request(f"{self.url}{path}", data=json.dumps(payload).encode(), headers=headers)

    def post(self, path: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(status, JSON body) of a forwarded request; an upstream error is relayed as it is."""
        try:
            with urllib.request.urlopen(self._request(path, payload), timeout=self.timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, _error_body(exc)
        except (OSError, ValueError) as exc:
            raise ServeError(
                502, f"the upstream engine {self.url} did not answer: {exc}", kind="server_error"
            ) from None

    async def stream(self, path: str, payload: dict[str, Any]) -> tuple[int, AsyncIterator[bytes] | dict[str, Any]]:
        """Open a streamed request: (status, the lines as they come) or (status, error body)."""
        loop = asyncio.get_running_loop()
        try:
            response = await asyncio.to_thread(urllib.request.urlopen, self._request(path, payload), None, self.timeout)
        except urllib.error.HTTPError as exc:
            return exc.code, _error_body(exc)
        except OSError as exc:
            raise ServeError(
                502, f"the upstream engine {self.url} did not answer: {exc}", kind="server_error"
            ) from None
        lines: asyncio.Queue = asyncio.Queue()

        def pump() -> None:
            try:
                for line in response:
                    loop.call_soon_threadsafe(lines.put_nowait, line)
            finally:
                response.close()
                loop.call_soon_threadsafe(lines.put_nowait, _END)

        threading.Thread(target=pump, daemon=True).start()

        async def relay() -> AsyncIterator[bytes]:
            try:
                while (line := await lines.get()) is not _END:
                    yield line
            finally:
                response.close()  # a client that left closes the upstream request too

        return response.status, relay()


def _error_body(exc: urllib.error.HTTPError) -> dict[str, Any]:
    try:
        return json.loads(exc.read())
    except ValueError:
        return {"error": {"message": f"upstream answered {exc.code} {exc.reason}", "type": "server_error"}}
