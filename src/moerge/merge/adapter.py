"""Writing a merge as a LoRA adapter that peft loads as-is.

Linear merges are exact: the merged update Σ c_k·B_k·A_k equals [B_1 … B_K]·[c_1A_1; …; c_KA_K],
so the factors are concatenated (rank = sum of ranks). Otherwise, or when a rank is requested,
each module's merged update is refactored by truncated SVD (the best rank-r approximation) and
its relative reconstruction error is reported. The adapter uses lora_alpha = r, i.e. scaling 1.
A merge whose update is zero in every module is refused (`MergePlan.check_nonzero`), and the factors are written
by `save_safetensors`, which refuses NaN/inf.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from moerge.library.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from moerge.merge.plan import MergePlan, release_freed_memory
from moerge.models.loading import save_safetensors
from moerge.paths import write_json_atomic

Progress = Callable[[int, int, str], None]
Factors = tuple[torch.Tensor, torch.Tensor]  # (A: r × in, B: out × r)


def truncated_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors (A, B) of `delta` and ‖Δ − B·A‖_F / ‖Δ‖_F.

    The top singular vectors come from an eigendecomposition of the smaller Gram matrix in float64:
    as exact as an SVD for the leading subspace, faster, and without LAPACK's SVD workspace.
    """
    d = delta.double()
    wide = d.shape[0] <= d.shape[1]
    with single_thread():
        eigenvalues, eigenvectors = torch.linalg.eigh(d @ d.T if wide else d.T @ d)  # ascending
    top = eigenvectors[:, -rank:].flip(-1)
    a, b = (top.T @ d, top) if wide else (top.T, d @ top)
    energy = eigenvalues.clamp(min=0)
    total = float(energy.sum())
    error = max(total - float(energy[-rank:].sum()), 0.0) / total if total > 0 else 0.0
    return a.to(delta.dtype), b.to(delta.dtype), error**0.5


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """LAPACK's threaded eigensolver is slower on these small matrices and stalls on a busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def concat_factors(plan: MergePlan, module: str) -> Factors:
    """Exact factors of a linear merge: stack c_k·s_k·A_k and concatenate B_k."""
    coefficients = plan.coefficients(module)
    pairs = [(e.factors(module), c) for e, c in zip(plan.experts, coefficients.tolist(), strict=True)]
    present = [(pair, c) for pair, c in pairs if pair is not None]
    a = torch.cat([pair[0] * c for pair, c in present])
    b = torch.cat([pair[1] for pair, _ in present], dim=1)
    return a, b


def merge_to_factors(
    plan: MergePlan, rank: int | None, progress: Progress | None = None
) -> tuple[dict[str, Factors], dict[str, float]]:
    """Per module (A, B) of the merged update, plus per-module SVD errors (empty when exact)."""
    exact = (plan.method.is_linear or plan.method.factored is not None) and rank is None
    if rank is None:
        rank = max(e.rank(m) for e in plan.experts for m in e.modules)
    factors: dict[str, Factors] = {}
    errors: dict[str, float] = {}
    nonzero = False
    for done, module in enumerate(plan.modules, 1):
        if exact:
            factors[module] = concat_factors(plan, module) if plan.method.is_linear else plan.merged_factors(module)
        else:
            a, b, errors[module] = truncated_svd(plan.delta(module), rank)
            factors[module] = (a, b)
        nonzero = nonzero or plan.factors_nonzero(*factors[module])
        release_freed_memory()
        if progress:
            progress(done, len(plan.modules), module)
    plan.check_nonzero(nonzero)
    return factors, errors


def write_adapter(folder: Path, plan: MergePlan, factors: dict[str, Factors]) -> int:
    """Save peft's two files into `folder`; every module padded to one rank r. Returns r."""
    rank = max(a.shape[0] for a, _ in factors.values())
    tensors = {}
    for module, (a, b) in factors.items():
        pad = rank - a.shape[0]
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.nn.functional.pad(a, (0, 0, 0, pad))
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.nn.functional.pad(b, (0, pad))
    save_safetensors(tensors, folder / ADAPTER_WEIGHTS, {"format": "pt"})
    write_json_atomic(folder / ADAPTER_CONFIG, adapter_config(plan, rank))
    return rank


def adapter_config(plan: MergePlan, rank: int) -> dict[str, Any]:
    """The first source's peft config, re-targeted at the merged modules with scaling 1."""
    config = plan.experts[0].config.model_dump(mode="json")
    config.update(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted({m.rsplit(".", 1)[-1] for m in plan.modules}),
        rank_pattern={},
        alpha_pattern={},
        use_rslora=False,
        layers_to_transform=None,
        layers_pattern=None,
        exclude_modules=None,
        inference_mode=True,
    )
    return config
