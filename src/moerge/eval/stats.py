"""Uncertainty of scores: a percentile bootstrap over test examples, so noise is not read as a difference;
and paired tests (bootstrap, McNemar, Holm) for differences between models scored on the same examples."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any


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


# ---- paired comparisons: every strategy is scored on the same examples ---------------------------------

Pair = tuple[str, str]


def _resample_counts(rng: Any, n: int, resamples: int) -> Any:
    """[resamples, n]: how often each of n examples is drawn in each bootstrap resample (n draws with
    replacement), so a resampled mean of any scores is one matrix product."""
    import numpy as np

    rows = rng.integers(0, n, size=(resamples, n)) + n * np.arange(resamples)[:, None]
    return np.bincount(rows.ravel(), minlength=resamples * n).reshape(resamples, n)


def _bootstrap_summary(observed: float, resampled: Any, n: int, *, level: float) -> dict[str, float | int]:
    """Percentile interval and two-sided bootstrap p-value of a difference from its resampled values.

    p = 2 · min(#{d* ≤ 0} + 1, #{d* ≥ 0} + 1) / (B + 1), capped at 1: twice the share of resamples on the
    far side of zero, with the +1 that keeps it above 0 (its floor is 2 / (B + 1), so use B ≥ 20·m/α before
    a Holm correction over m tests). It is below 1 − level about when zero lies outside the interval.
    """
    import numpy as np

    draws = np.sort(np.round(np.asarray(resampled, dtype=float), 12))  # a sum of per-task means that is 0 is 0
    count = len(draws)
    tail = (1 - level) / 2
    below, above = int((draws <= 0).sum()), int((draws >= 0).sum())
    return {
        "diff": float(observed),
        "ci_low": float(draws[int(tail * (count - 1))]),
        "ci_high": float(draws[int((1 - tail) * (count - 1))]),
        "p": min(1.0, 2 * min(below + 1, above + 1) / (count + 1)),
        "n": n,
    }


def paired_matrix(
    tasks: dict[str, dict[str, Sequence[float]]],
    pairs: Sequence[Pair],
    *,
    level: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> dict[Pair, dict[str, Any]]:
    """The stratified paired bootstrap of macro-mean differences for many pairs of models at once.

    `tasks` maps task → model → per-example scores (the same examples, in the same order, for every model
    of a task). For a pair (x, y), the statistic is the mean over the tasks both were scored on (with equal
    counts) of mean(x − y) on the task; each resample draws example indices within every task, jointly for
    both models, so the interval reflects only how the two differ per example, not how hard the examples
    are (which two unpaired intervals count twice), and a small task weighs as much as a large one.

    The resamples of a task are drawn once and shared by every model scored on it: each pair's resampled
    differences are then a paired bootstrap, and a pair costs one subtraction. Returns, per pair with at
    least one shared task: diff, ci_low, ci_high, p (see `_bootstrap_summary`), n (examples) and tasks.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    draws = {pair: np.zeros(resamples) for pair in pairs}
    observed = {pair: 0.0 for pair in pairs}
    shared: dict[Pair, list[str]] = {pair: [] for pair in pairs}
    examples = dict.fromkeys(pairs, 0)
    for task, models in tasks.items():
        for n in sorted({len(s) for s in models.values()} - {0}):
            names = [m for m, s in models.items() if len(s) == n]
            used = [p for p in pairs if p[0] in names and p[1] in names]
            if not used:
                continue
            scores = np.asarray([models[m] for m in names], dtype=float)  # [models, n]
            means = _resample_counts(rng, n, resamples) @ scores.T / n  # [resamples, models]
            for x, y in used:
                i, j = names.index(x), names.index(y)
                draws[(x, y)] += means[:, i] - means[:, j]
                observed[(x, y)] += float(scores[i].mean() - scores[j].mean())
                shared[(x, y)].append(task)
                examples[(x, y)] += n
    out = {}
    for pair in pairs:
        if shared[pair]:
            k = len(shared[pair])
            summary = _bootstrap_summary(observed[pair] / k, draws[pair] / k, examples[pair], level=level)
            out[pair] = {**summary, "tasks": shared[pair]}
    return out


def _nan_summary() -> dict[str, float | int]:
    return {"diff": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "p": 1.0, "n": 0}


def _check_paired(a: Sequence[float], b: Sequence[float]) -> None:
    if len(a) != len(b):
        raise ValueError(f"paired scores need equal lengths, got {len(a)} and {len(b)}")


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], *, level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> dict[str, float | int]:
    """mean(a − b) with a percentile interval and a bootstrap p-value, resampling example indices jointly:
    a[i] and b[i] are two models' scores on the same example i, and a resample keeps them together.
    Returns diff, ci_low, ci_high, p and n (see `paired_matrix`)."""
    _check_paired(a, b)
    found = paired_matrix({"": {"a": a, "b": b}}, [("a", "b")], level=level, resamples=resamples, seed=seed)
    return {k: v for k, v in found[("a", "b")].items() if k != "tasks"} if found else _nan_summary()


def stratified_paired_bootstrap(
    pairs: Sequence[tuple[Sequence[float], Sequence[float]]],
    *,
    level: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, float | int]:
    """The paired bootstrap of a macro-mean difference: `pairs` holds one (a, b) per task; each resample
    draws indices within every task (jointly for a and b) and averages the per-task mean differences, as
    in the macro means the report shows (see `paired_matrix`)."""
    for a, b in pairs:
        _check_paired(a, b)
    tasks = {str(i): {"a": a, "b": b} for i, (a, b) in enumerate(pairs)}
    found = paired_matrix(tasks, [("a", "b")], level=level, resamples=resamples, seed=seed)
    return {k: v for k, v in found[("a", "b")].items() if k != "tasks"} if found else _nan_summary()


def mcnemar(a: Sequence[float], b: Sequence[float]) -> dict[str, float | int]:
    """Exact two-sided sign test on paired scores: a_only = #(a > b), b_only = #(a < b), ties dropped,
    p = P(Binomial(a_only + b_only, ½) at least as far from the middle) (doubled smaller tail, capped at 1).

    On 0/1 outcomes (accuracy) a_only and b_only are the discordant pairs, and this is McNemar's exact
    (binomial) test. On graded scores it is the paired sign test: it asks only which model scored higher on
    each example, not by how much (the paired bootstrap covers the size).
    """
    _check_paired(a, b)
    a_only = sum(x > y for x, y in zip(a, b, strict=True))
    b_only = sum(x < y for x, y in zip(a, b, strict=True))
    m = a_only + b_only
    tail = sum(math.comb(m, k) for k in range(min(a_only, b_only) + 1)) / 2**m if m else 1.0
    return {"a_only": a_only, "b_only": b_only, "p": min(1.0, 2 * tail)}


def holm(pvalues: Sequence[float], *, alpha: float = 0.05) -> tuple[list[float], list[bool]]:
    """Holm–Bonferroni: adjusted p-values (in the given order) and which hypotheses are rejected at `alpha`.

    The i-th smallest p (i from 0) is multiplied by m − i, and the adjusted values are made non-decreasing
    in that order (capped at 1); a hypothesis is rejected when its adjusted p ≤ alpha. This controls the
    chance of any false claim among the m at alpha, without assuming the tests are independent.
    """
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted, [p <= alpha for p in adjusted]
