"""Scale out on vLLM: the launch command that serves a library's experts as vLLM LoRA adapters, each
under its library name (what `model` names in a request), so clients keep the same model names."""

from __future__ import annotations

import shlex
from typing import Any

from moerge.errors import MoergeError

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM's --max-lora-rank accepts."""


def vllm_command(library: Any, base: str) -> tuple[str, list[str]]:
    """(the `vllm serve` command line, the experts left out with why): plain LoRA experts only, since
    vLLM applies B·A updates; DoRA, full-weight and other adapters are listed as left out."""
    from moerge.library.adapter import LoraAdapter, open_adapter

    modules, ranks, skipped = [], [], []
    for name in library.names():
        folder = library.path(name)
        try:
            adapter = open_adapter(folder)
            if not isinstance(adapter, LoraAdapter):
                raise MoergeError(f"a {adapter.config.peft_type} adapter, not LoRA")
            adapter.require_plain("vLLM")
        except MoergeError as exc:
            skipped.append(f"{name}: {exc}")
            continue
        modules.append(f"{name}={folder}")
        ranks.append(max(adapter.rank(module) for module in adapter.modules))
    if not modules:
        raise MoergeError(f"{library.url}: no plain LoRA expert to serve with vLLM")
    rank = next((r for r in VLLM_RANKS if r >= max(ranks)), None)
    if rank is None:
        raise MoergeError(f"an expert's rank {max(ranks)} is above what vLLM serves ({VLLM_RANKS[-1]})")
    args = ["vllm", "serve", base, "--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(len(modules))]
    return shlex.join([*args, "--lora-modules", *modules]), skipped
