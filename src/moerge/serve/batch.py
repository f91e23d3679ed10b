"""Many experts in one forward pass, with continuous (iteration-level) batching.

The library's plain LoRA experts are stacked on one base model (the stacked-expert layer routers use);
row i of a batch reads its own experts' update through its own routing weights, applied per example
(`merge` aggregation: each row gathers only its k experts' factors, not all K). A row for an expert has
that expert with weight 1 (`base`: none); a row for an example-level router (centroid, classifier, ...:
one decision per prompt, the same in every layer) has the weights the router gives its prompt, computed
once, before its prefill, by the router's own scoring and policy (`StackRouter`).

`DecodeBatch` holds the KV cache of every running row, left-padded to one length with a padding mask
and each row's own next position. A request joins at the next decoding step: its prompt is prefilled
alone (so its first token is exactly what it would be alone), and its cache is padded and concatenated
to the batch's; a row that finishes is dropped from the cache at once. A request for expert A thus
never waits for a generation for expert B, and nothing waits for the longest row of a batch.
An expert added to the library while the server runs is stacked the first time it is asked for.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moerge.errors import MoergeError
from moerge.serve.models import BASE, ModelPool

Route = tuple[tuple[str, float], ...]  # a row's stacked experts and their weights (empty: the bare base)


@dataclass
class StackRouter:
    """An example-level router served on the stack: its scoring (`router`, bound to the stack when
    used), its saved policy, and the stacked expert each of its experts is (in the router's order)."""

    router: Any
    policy: Any
    experts: list[str]


class ExpertStack:
    """The base model with the library's plain LoRA experts attached, rebuilt when a new one is asked for."""

    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool
        self.model: Any = None
        self.tokenizer: Any = None
        self.names: list[str] = []
        self.supported = True  # the model's KV cache can be padded, merged and split per row
        self._plain: dict[str, bool] = {}
        self._routers: dict[str, StackRouter | None] = {}
        self._index: dict[str, int] = {}
        self._fingerprint = ""
        self._keep_logits: dict[str, int] = {}
        self._cache_arg = "cache"  # transformers 5 names the forward's cache `cache`; older ones `past_key_values`

    def accepts(self, name: str) -> bool:
        """`base`, a library expert whose update is plain LoRA (DoRA, full-weight experts: served
        alone), or an example-level router over such experts (`router_of`), on a model whose cache is
        one growing tensor per layer (not sliding windows)."""
        if name != BASE and self.pool.library is None:
            return False
        self._load()
        if not self.supported:
            return False
        if name == BASE:
            return True
        if name in self.pool.routers:
            return self.router_of(name) is not None
        return self._plain_expert(name)

    def _plain_expert(self, name: str) -> bool:
        if name not in self._plain:
            self._plain[name] = _is_plain_lora(self.pool.library.path(name))
        return self._plain[name]

    def _load(self) -> None:
        if self.model is not None or not self.supported:
            return
        from moerge.models import fingerprint, load_base

        self.supported = False  # until it has loaded: a base that fails to load is not retried per request
        self.model, self.tokenizer = load_base(self.pool.base)
        self._fingerprint = fingerprint(self.model)
        params = inspect.signature(self.model.forward).parameters
        self.supported = "position_ids" in params and _plain_cache(self.model)
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        if "logits_to_keep" in params:
            self._keep_logits = {"logits_to_keep": 1}

    def ensure(self, wanted: set[str]) -> None:
        """Stack every plain expert of the library, if one of `wanted` is not stacked yet. Rows already
        running keep their caches: the base weights are the same, and rows name their expert. When the
        whole library cannot be stacked (an expert of another base), the stacked ones plus `wanted` are;
        when that fails too, the stack is left as it was and the error is raised for `wanted` alone."""
        self._load()
        if wanted <= set(self.names):
            return
        library = [n for n in self.pool.library.names() if self.accepts(n)] if self.pool.library is not None else []
        previous = list(self.names)
        try:
            self._attach(library)
        except MoergeError:
            try:
                self._attach([*previous, *sorted(wanted - set(previous))])
            except MoergeError:
                self._attach(previous)
                raise

    def _attach(self, names: list[str]) -> None:
        from moerge.route import attach_experts

        if hasattr(self.model, "moerge_routing"):
            self.model = self.model.moerge_routing.detach()
        self.names, self._index = [], {}
        if names:
            folders = {n: self.pool.library.path(n) for n in names}
            handle = attach_experts(self.model, folders, base_fingerprint=self._fingerprint)
            for layer in handle.layers.values():
                layer.merge = True  # per-example weights: gather each row's experts' factors, do not mix all K
        self.names, self._index = names, {n: i for i, n in enumerate(names)}

    # ------------------------------------------------------------------------------- routers

    def router_of(self, name: str) -> StackRouter | None:
        """The served router `name` as a `StackRouter`, or None when it must be served alone: a router
        with per-token scores (its weights differ per token or per layer), one built on another base, or
        one with an expert that is not a plain LoRA expert of the library (matched by folder)."""
        if name not in self._routers:
            try:
                self._routers[name] = self._read_router(Path(self.pool.routers[name]))
            except MoergeError:  # served alone, where the pool reports what is wrong with it
                self._routers[name] = None
        return self._routers[name]

    def _read_router(self, folder: Path) -> StackRouter | None:
        from moerge.models.loading import read_safetensors
        from moerge.route import get_router, parse_policy, read_router_config
        from moerge.route.folder import CONFIG_FILE, TENSORS_FILE
        from moerge.route.router import Router

        config = read_router_config(folder)
        cls = get_router(config["router"])
        if cls.token_scores is not Router.token_scores:
            return None
        if config.get("base", {}).get("fingerprint", "unknown") not in ("unknown", self._fingerprint):
            return None
        by_folder = {_resolved(self.pool.library.path(n)): n for n in self.pool.library.names()}
        experts = [by_folder.get(_resolved(e["path"])) for e in config["experts"]]
        if any(n is None or not self._plain_expert(n) for n in experts):
            return None
        router = cls(
            [e["name"] for e in config["experts"]], cls.parse_options(config.get("options")), config.get("derived")
        )
        router.load_tensors(read_safetensors(folder / TENSORS_FILE))
        policy = parse_policy(config["policy"], str(folder / CONFIG_FILE))
        return StackRouter(router.to(self.device), policy, experts)

    def experts_of(self, name: str) -> set[str]:
        """The stacked experts rows of model `name` may read."""
        if name == BASE:
            return set()
        if name in self.pool.routers:
            return set(self.router_of(name).experts)
        return {name}

    def prompt_format(self, name: str) -> Any:
        """A served router's prompt format, as the pool gives it: its experts' when they agree."""
        from moerge.data.formats import combined

        handle = self.model.moerge_routing
        return combined([handle.experts[self._index[n]].prompt_format for n in self.router_of(name).experts])

    def route(self, name: str, ids: list[int]) -> tuple[Route, dict[str, float] | None]:
        """How a row of model `name` with prompt `ids` reads the stack, and for a router its routing
        decision as the pool reports it (each of its experts' weight, rounded)."""
        if name == BASE:
            return (), None
        if name not in self.pool.routers:
            return ((name, 1.0),), None
        served = self.router_of(name)
        weights = self._router_weights(served, ids)
        route = tuple((n, float(w)) for n, w in zip(served.experts, weights.tolist(), strict=True) if w != 0)
        names = served.router.expert_names
        return route, {n: round(float(w), 4) for n, w in zip(names, weights.tolist(), strict=True)}

    def _router_weights(self, served: StackRouter, ids: list[int]) -> Any:
        """The prompt's weights [K_router], as `moerge.route.Routing` computes example-level weights on a
        prefill: the router's example scores (pooled per task under task granularity), then its policy."""
        import torch

        from moerge.route.policies import pool_tasks
        from moerge.route.router import RouterEnv
        from moerge.route.stacked import Step, current_context

        served.router.bind(RouterEnv(self.model.moerge_routing, self.tokenizer))
        step = Step(
            torch.tensor([ids], device=self.device),
            torch.ones((1, len(ids)), dtype=torch.bool, device=self.device),
            True,
            current_context(),
        )
        with torch.no_grad():
            scores = served.router.example_scores(step)
            if served.policy.granularity == "task":
                scores = pool_tasks(scores, step.context.get("task_ids"))
            return served.policy.select(scores)[0]

    # ------------------------------------------------------------------------------- decoding

    def select(self, rows: list[Route]) -> None:
        """Row i reads the experts of `rows[i]` with their weights in the next forward passes (padded
        with weight-0 entries to the longest row's k), so each layer gathers only those experts' factors."""
        import torch

        from moerge.route.stacked import SparseRouting

        missing = sorted({name for route in rows for name, _ in route} - set(self._index))
        if missing:  # never decode an expert's row with the bare base
            raise MoergeError(f"experts {missing} are not stacked on the served base")
        handle = getattr(self.model, "moerge_routing", None)
        if handle is None:
            return
        width = max([1, *(len(route) for route in rows)])
        index = [[self._index[n] for n, _ in route] + [0] * (width - len(route)) for route in rows]
        weight = [[w for _, w in route] + [0.0] * (width - len(route)) for route in rows]
        device = self.device
        handle.set_weights(SparseRouting(torch.tensor(index, device=device), torch.tensor(weight, device=device)))

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def prefill(self, ids: list[int], route: Route) -> tuple[Any, Any]:
        """(the logits after the prompt, its KV cache): one prompt alone, as `generate` would run it."""
        import torch
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        self.select([route])
        with torch.no_grad():
            out = self.model(
                input_ids=torch.tensor([ids], device=self.device),
                attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=self.device),
                position_ids=torch.arange(len(ids), device=self.device)[None],
                use_cache=True,
                **{self._cache_arg: cache},
                **self._keep_logits,
            )
        return out.logits[0, -1].float(), cache

    def decode(self, batch: DecodeBatch, tokens: list[int], routes: list[Route]) -> Any:
        """One decoding step of every running row (row i fed `tokens[i]`, reading `routes[i]`): logits [B, V]."""
        import torch

        self.select(routes)
        ids = torch.tensor(tokens, device=self.device)[:, None]
        mask = torch.cat([batch.mask, batch.mask.new_ones((len(tokens), 1))], dim=1)
        with torch.no_grad():
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=batch.positions[:, None],
                use_cache=True,
                **{self._cache_arg: batch.cache},
            )
        batch.mask, batch.positions = mask, batch.positions + 1
        return out.logits[:, -1].float()


class DecodeBatch:
    """The running rows' KV cache, left-padded to one length: `mask` [B, L] marks real positions,
    `positions` [B] is each row's next position id (its own length, whatever the padding)."""

    def __init__(self) -> None:
        self.cache: Any = None
        self.mask: Any = None
        self.positions: Any = None

    def __len__(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def join(self, cache: Any, length: int, copies: int) -> None:
        """Append `copies` rows that continue a prefilled prompt of `length` tokens (its `cache`)."""
        import torch

        for layer in cache.layers:
            layer.keys = layer.keys.expand(copies, -1, -1, -1)
            layer.values = layer.values.expand(copies, -1, -1, -1)
        device = cache.layers[0].keys.device
        mask = torch.ones((copies, length), dtype=torch.long, device=device)
        positions = torch.full((copies,), length, dtype=torch.long, device=device)
        if self.cache is None:
            self.cache, self.mask, self.positions = cache, mask, positions
            return
        width = max(self.mask.shape[1], length)
        for mine, new in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width, 2), _left_pad(new.keys, width, 2)])
            mine.values = torch.cat([_left_pad(mine.values, width, 2), _left_pad(new.values, width, 2)])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])
        self.positions = torch.cat([self.positions, positions])

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order), and drop the leading columns that are padding in all of them."""
        import torch

        if not rows:
            self.cache = self.mask = self.positions = None
            return
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask[index]
        drop = int(mask.any(0).nonzero()[0, 0])
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, drop:]
            layer.values = layer.values[index, :, drop:]
        self.mask, self.positions = mask[:, drop:], self.positions[index]


def next_tokens(logits: Any, samplers: list[tuple[float, float, Any] | None]) -> list[int]:
    """Each row's next token: greedy (argmax) for a row without a sampler, else sampled from its
    (temperature, top_p, generator) as transformers' `generate` samples (temperature, then top-p,
    then one multinomial draw), so a seeded row draws the same tokens in any batch."""
    import torch

    picked = logits.argmax(-1).tolist()
    for i, sampler in enumerate(samplers):
        if sampler is not None:
            temperature, top_p, generator = sampler
            probs = torch.softmax(_top_p(logits[i : i + 1] / temperature, top_p), dim=-1)
            picked[i] = int(torch.multinomial(probs, 1, generator=generator))
    return picked


def _top_p(scores: Any, top_p: float) -> Any:
    """Transformers' TopPLogitsWarper: drop the least likely tokens whose total mass is at most 1 - top_p."""
    if top_p >= 1.0:
        return scores
    ordered, order = scores.sort(descending=False)
    remove = ordered.softmax(-1).cumsum(-1) <= (1 - top_p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))


def _left_pad(tensor: Any, width: int, dim: int) -> Any:
    """`tensor` with zeros prepended along `dim` up to `width`."""
    import torch

    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _plain_cache(model: Any) -> bool:
    """Whether `model`'s dynamic cache is one growing key/value tensor per layer (sliding-window and
    other special layers cannot be left-padded and merged; such models are served one request at a time)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:  # a config transformers cannot read for caching: serve it alone
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _resolved(folder: Any) -> Path:
    return Path(folder).expanduser().resolve()


def _is_plain_lora(folder: Any) -> bool:
    from moerge.library.adapter import LoraAdapter, open_adapter

    try:
        adapter = open_adapter(folder)
        return isinstance(adapter, LoraAdapter) and bool(adapter.require_plain("batched serving"))
    except MoergeError:
        return False
