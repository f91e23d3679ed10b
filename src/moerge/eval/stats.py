"""Uncertainty of scores: a percentile bootstrap over test examples, so noise is not read as a difference."""

from __future__ import annotations

import random
from collections.abc import Sequence


def bootstrap_ci(
    scores: Sequence[float], *, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of the mean of `scores` (resampled with replacement, seeded)."""
    n = len(scores)
    if n == 0:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    means = sorted(sum(scores[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    low = means[int(tail * (resamples - 1))]
    high = means[int((1 - tail) * (resamples - 1))]
    return (low, high)


def summarise(scores: Sequence[float], *, seed: int = 0) -> dict[str, float | int]:
    """Mean, n and 95% interval of per-example scores."""
    low, high = bootstrap_ci(scores, seed=seed)
    n = len(scores)
    return {"mean": sum(scores) / n if n else float("nan"), "n": n, "ci_low": low, "ci_high": high}


def stratified_ci(
    groups: Sequence[Sequence[float]], *, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Interval of the macro mean (mean of group means), resampling within each group."""
    groups = [g for g in groups if len(g)]
    if not groups:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    means = sorted(
        sum(sum(g[rng.randrange(len(g))] for _ in g) / len(g) for g in groups) / len(groups) for _ in range(resamples)
    )
    tail = (1 - level) / 2
    return (means[int(tail * (resamples - 1))], means[int((1 - tail) * (resamples - 1))])
