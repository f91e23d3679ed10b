"""Oracle: each example's task label picks its expert — the upper bound routers are compared with."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from moerge.errors import MoergeError
from moerge.route.policies import Policy
from moerge.route.router import OptionsModel, Router, RouterEnv, register_router
from moerge.route.stacked import Step


class OracleOptions(OptionsModel):
    task_to_expert: dict[str, str] | None = Field(
        None,
        description="task id → expert name; when unset, each expert's task name and source (its moerge.json)",
    )


@register_router("oracle")
class OracleRouter(Router):
    """Oracle: each example's task id picks its own expert (the routers' upper bound).

    Task ids come from `routing_context(task_ids=[...])`: an expert name, its task name, or an index.
    The chosen expert scores 0 and all others -inf, so any policy gives it weight exactly 1. Without
    the `task_to_expert` option, the build derives the map (`derived["task_to_expert"]`).
    """

    options_model: ClassVar[type[OptionsModel]] = OracleOptions
    options: OracleOptions
    default_policy: ClassVar[Policy] = Policy("top_k", k=1, granularity="example")

    def build(self, env: RouterEnv) -> None:
        if self.options.task_to_expert is None:
            self.derived["task_to_expert"] = self._recorded_tasks(env)

    def _recorded_tasks(self, env: RouterEnv) -> dict[str, str]:
        from moerge.library.expert import read_expert_meta

        tasks = {}
        for name, expert in zip(self.expert_names, env.handle.experts, strict=True):
            if (expert.folder / "moerge.json").is_file():
                task = read_expert_meta(expert.folder).task
                tasks.update({task.name: name, task.source: name})
        return tasks

    def _index(self, task: Any) -> int:
        if isinstance(task, int) and 0 <= task < self.num_experts:
            return task
        mapping = self.options.task_to_expert
        if mapping is None:
            mapping = self.derived.get("task_to_expert", {})
        name = mapping.get(task, task)
        if name not in self.expert_names:
            raise MoergeError(f"oracle router: task {task!r} has no expert (experts: {', '.join(self.expert_names)})")
        return self.expert_names.index(name)

    def example_scores(self, step: Step) -> torch.Tensor:
        task_ids = step.context.get("task_ids")
        batch = step.mask.shape[0]
        if task_ids is None or len(task_ids) != batch:
            raise MoergeError("oracle router: needs one task id per example: routing_context(task_ids=[...])")
        scores = torch.full((batch, self.num_experts), float("-inf"))
        scores[torch.arange(batch), torch.tensor([self._index(t) for t in task_ids])] = 0.0
        return scores
