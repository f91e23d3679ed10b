"""Many experts in one forward pass: the library's plain LoRA experts stacked on one base model (the
stacked-expert layer routers use), each row of a batch reading its own expert's update.

Greedy requests for `base` or any plain LoRA expert that arrive together are answered by one batched
`generate`: row i gets a one-hot routing weight on its expert (all zeros for `base`), applied as a
per-example update (`merge` aggregation: one gathered expert per row, not K). A request for expert A
thus never waits behind a whole generation for expert B. An expert added to the library while the
server runs is stacked the first time it is asked for.
"""

from __future__ import annotations

from typing import Any

from moerge.errors import MoergeError
from moerge.serve.models import BASE, ModelPool


class ExpertStack:
    """The base model with the library's plain LoRA experts attached, rebuilt when a new one is asked for."""

    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool
        self.model: Any = None
        self.tokenizer: Any = None
        self.names: list[str] = []
        self._plain: dict[str, bool] = {}

    def accepts(self, name: str) -> bool:
        """`base`, or a library expert whose update is plain LoRA (DoRA, full-weight experts: served alone)."""
        if name == BASE:
            return True
        if self.pool.library is None or name in self.pool.routers:
            return False
        if name not in self._plain:
            self._plain[name] = _is_plain_lora(self.pool.library.path(name))
        return self._plain[name]

    def ensure(self, wanted: set[str]) -> None:
        """Stack every plain expert of the library, if one of `wanted` is not stacked yet."""
        from moerge.models import load_base
        from moerge.route import attach_experts

        if self.model is not None and wanted <= set(self.names):
            return
        if self.model is None:
            self.model, self.tokenizer = load_base(self.pool.base)
        elif hasattr(self.model, "moerge_routing"):
            self.model = self.model.moerge_routing.detach()
        names = [n for n in self.pool.library.names() if self.accepts(n)] if self.pool.library is not None else []
        self.names = names
        if names:
            handle = attach_experts(self.model, {n: self.pool.library.path(n) for n in names})
            for layer in handle.layers.values():
                layer.merge = True  # one expert per row: gather its factors, do not mix all K

    def select(self, rows: list[str]) -> None:
        """Row i reads expert `rows[i]` (nothing for `base`) in the next forward passes."""
        import torch

        handle = getattr(self.model, "moerge_routing", None)
        if handle is None:
            return
        weights = torch.zeros(len(rows), len(self.names))
        for i, name in enumerate(rows):
            if name != BASE:
                weights[i, self.names.index(name)] = 1.0
        handle.set_weights(weights)

    def release(self) -> None:
        handle = getattr(self.model, "moerge_routing", None)
        if handle is not None:
            handle.set_weight_fn(None)


def _is_plain_lora(folder: Any) -> bool:
    from moerge.library.adapter import LoraAdapter, open_adapter

    try:
        adapter = open_adapter(folder)
        return isinstance(adapter, LoraAdapter) and bool(adapter.require_plain("batched serving"))
    except MoergeError:
        return False
