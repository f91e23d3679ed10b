"""Which experts received how much routing weight, per task (and per layer), on a routed model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from moerge.data.formats import PromptFormat
from moerge.data.task import Example
from moerge.errors import MoergeError
from moerge.route.embed import encode_prompts
from moerge.route.stacked import routing_context


def explain_routing(
    model: Any,
    tokenizer: Any,
    tasks: Mapping[str, Sequence[Example]],
    formats: Mapping[str, PromptFormat],
    *,
    batch_size: int = 8,
) -> dict[str, dict[str, Any]]:
    """Per task: `overall` [K] mean weight per expert, `layers` {module: [K]}, `top1` share per expert
    (an example whose top weight is tied, to float noise, between m experts counts 1/m for each, so uniform routing
    reads as chance, 1/K, not as "everything to the first expert").

    Weights are averaged over each prompt's non-padding tokens, then over examples (and layers for
    `overall`). Each prompt is rendered in its task's format (`formats`) and routed with
    `routing_context(task_ids=[task])`, which the oracle needs.
    """
    handle = getattr(model, "moerge_routing", None)
    routing = getattr(handle, "routing", None)
    if routing is None:
        raise MoergeError("explain: the model has no router attached (load it with moerge.load_routed)")
    report = {}
    for task, examples in tasks.items():
        routing.start_recording()
        for i in range(0, len(examples), batch_size):
            batch = list(examples[i : i + batch_size])
            ids, mask = encode_prompts(tokenizer, batch, formats[task])
            with torch.no_grad(), routing_context(task_ids=[task] * len(batch)):
                model(input_ids=ids, attention_mask=mask)
        layers = {module: torch.cat(rows).mean(0) for module, rows in routing.records.items()}
        per_example = torch.stack([torch.cat(rows) for rows in routing.records.values()]).mean(0)
        top = torch.isclose(per_example, per_example.max(-1, keepdim=True).values, rtol=1e-5, atol=1e-7)
        top1 = (top.float() / top.sum(-1, keepdim=True)).sum(0)  # a tie for the top shares the example
        report[task] = {
            "experts": handle.expert_names,
            "overall": torch.stack(list(layers.values())).mean(0).tolist(),
            "layers": {module: w.tolist() for module, w in layers.items()},
            "top1": (top1 / top1.sum()).tolist(),
        }
        routing.records = None
    return report


def routing_accuracy(report: Mapping[str, Mapping[str, Any]], task_to_expert: Mapping[str, str]) -> float:
    """Share of examples whose top expert (weights averaged over layers) is their task's own expert."""
    hits, total = 0.0, 0
    for task, row in report.items():
        if task in task_to_expert:
            hits += row["top1"][row["experts"].index(task_to_expert[task])]
            total += 1
    return hits / max(total, 1)
