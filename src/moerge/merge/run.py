"""Running a merge end to end: open experts, merge module by module, write an expert folder.

The result is an ordinary expert folder (peft adapter, or full model) whose `moerge.json`
records its provenance: sources, method, parameters and, for SVD refactoring, per-module
reconstruction errors.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moerge.data.formats import MIXED, combined, format_name
from moerge.errors import MoergeError
from moerge.library.adapter import LoraAdapter, check_same_base
from moerge.library.expert import BaseInfo, ExpertMeta, TaskInfo, write_expert_meta
from moerge.merge.adapter import merge_to_factors, write_adapter
from moerge.merge.config import MergeSpec
from moerge.merge.full import check_base_fingerprint, resolve_base_folder, write_full
from moerge.merge.plan import MergePlan, open_experts
from moerge.paths import EXPERT, atomic_directory, check_replaceable

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class MergeResult:
    path: Path
    meta: ExpertMeta
    reconstruction_error: dict[str, float]


def build_plan(spec: MergeSpec) -> MergePlan:
    method, options = spec.method_and_options()
    experts = open_experts(spec.folders())
    return MergePlan(experts, method, torch.tensor(spec.weights, dtype=torch.float32), options)


def run_merge(spec: MergeSpec, progress: Progress | None = None) -> MergeResult:
    """Merge as `spec` says. With a library and an adapter output, the result joins the library.

    A folder output is claimed by the shared rule (`check_replaceable`) before any expert is read:
    `overwrite` replaces an expert folder only, never a router, a file or a folder moerge did not write.
    """
    to_library = spec.library is not None and spec.output.kind == "adapter"
    final = Path(spec.output.out).expanduser()
    if not to_library:
        check_replaceable(final, overwrite=bool(spec.output.overwrite), kind=EXPERT)
    plan = build_plan(spec)
    _refuse_own_input(spec, plan, final, to_library)
    if to_library:
        from moerge.library import ExpertLibrary

        library = ExpertLibrary(spec.library)
        if not spec.output.overwrite and spec.output.out in library.names():
            raise MoergeError(f"output.out: expert {spec.output.out!r} already exists in {spec.library} (--overwrite)")
        with tempfile.TemporaryDirectory(prefix="moerge-merge-") as tmp:
            folder = Path(tmp) / spec.output.out
            folder.mkdir()
            meta, errors = _write(folder, spec, plan, progress)
            name = library.add(folder, name=spec.output.out, overwrite=spec.output.overwrite)
        return MergeResult(Path(library.path(name)), meta, errors)
    with atomic_directory(final, overwrite=bool(spec.output.overwrite), kind=EXPERT) as folder:
        meta, errors = _write(folder, spec, plan, progress)
    return MergeResult(final, meta, errors)


def _refuse_own_input(spec: MergeSpec, plan: MergePlan, final: Path, to_library: bool) -> None:
    """The output may not be one of the experts being merged (with --overwrite it would replace it)."""
    if to_library:
        clash = spec.output.out in {e.label for e in plan.experts} and spec.library is not None
    else:
        target = final.resolve()
        clash = any(target == e.folder.resolve() or target in e.folder.resolve().parents for e in plan.experts)
    if clash:
        raise MoergeError(f"output.out: {spec.output.out} is one of the experts being merged; choose another output")


def _write(
    folder: Path, spec: MergeSpec, plan: MergePlan, progress: Progress | None
) -> tuple[ExpertMeta, dict[str, float]]:
    errors: dict[str, float] = {}
    extra: dict[str, Any] = {}
    if spec.output.kind == "adapter":
        base_info = _adapter_base(plan.experts, spec.output.base)
        factors, errors = merge_to_factors(plan, spec.output.rank, progress)
        extra["rank"] = write_adapter(folder, plan, factors)
        extra["exact"] = not errors
    else:
        base = resolve_base_folder(spec.output.base or "")
        base_info = BaseInfo(name_or_path=spec.output.base or str(base), fingerprint=check_base_fingerprint(plan, base))
        extra["shards"] = write_full(
            folder, plan, base, max_shard_bytes=spec.output.max_shard_mb << 20, progress=progress
        )
    meta = merged_meta(Path(spec.output.out).name, spec, plan, base_info, errors, extra)
    return write_expert_meta(folder, meta), errors


def merged_meta(
    name: str,
    spec: MergeSpec,
    plan: MergePlan,
    base: BaseInfo,
    errors: dict[str, float],
    extra: dict[str, Any],
) -> ExpertMeta:
    """Metadata of the merged expert, with full provenance."""
    method = f"merge:{plan.method.name}"
    parameters = plan.options.model_dump(mode="json")
    hyper = {"method": plan.method.name, "weights": spec.weights, **parameters, **extra}
    provenance = {
        "method": plan.method.name,
        "parameters": parameters,
        "sources": [_source(e, w) for e, w in zip(plan.experts, spec.weights, strict=True)],
        "reconstruction_error": errors,
        "reconstruction_error_max": max(errors.values(), default=0.0),
        "reconstruction_error_mean": sum(errors.values()) / len(errors) if errors else 0.0,
    }
    fmt = combined([e.prompt_format for e in plan.experts])
    if fmt == MIXED:  # record the disagreement: which source was trained with which format
        provenance["prompt_formats"] = {e.label: format_name(e.prompt_format) for e in plan.experts}
    return ExpertMeta(
        name=name,
        kind=spec.output.kind,
        method=method,
        task=TaskInfo(name="merged", source="merge"),
        base=base,
        hyperparameters=hyper,
        provenance=provenance,
        prompt_format=fmt,
    )


def _source(expert: LoraAdapter, weight: float) -> dict[str, Any]:
    meta = expert.meta
    return {
        "name": expert.label,
        "path": str(expert.folder),
        "weight": weight,
        "task": meta.task.name if meta else None,
        "method": meta.method if meta else None,
        "fingerprint": expert.fingerprint,
        "prompt_format": format_name(expert.prompt_format),
    }


def _adapter_base(experts: list[LoraAdapter], base: str | None) -> BaseInfo:
    """An adapter merge sits on its sources' base; a base the user names is checked against them."""
    if base is None:
        return _base_info(experts)
    from moerge.models import fingerprint

    actual = fingerprint(base)
    check_same_base(experts, actual, base_name=f"output.base {base}")
    return BaseInfo(name_or_path=base, fingerprint=actual)


def _base_info(experts: list[LoraAdapter]) -> BaseInfo:
    for expert in experts:
        if expert.meta is not None:
            return expert.meta.base
    return BaseInfo(name_or_path=experts[0].config.base_model_name_or_path or "unknown")
