import math
import statistics

import pytest

from moerge.eval.stats import bootstrap_ci, summarise


def test_interval_contains_mean_and_matches_normal_approximation():
    scores = [1.0] * 60 + [0.0] * 40
    low, high = bootstrap_ci(scores, resamples=4000)
    mean = 0.6
    half = 1.96 * statistics.pstdev(scores) / math.sqrt(len(scores))  # ≈ 0.096
    assert low < mean < high
    assert low == pytest.approx(mean - half, abs=0.02) and high == pytest.approx(mean + half, abs=0.02)


def test_interval_shrinks_with_more_examples():
    small = bootstrap_ci([1.0, 0.0] * 10)
    large = bootstrap_ci([1.0, 0.0] * 500)
    assert (large[1] - large[0]) < (small[1] - small[0]) / 4


def test_constant_scores_have_zero_width_and_seed_is_deterministic():
    assert bootstrap_ci([1.0] * 30) == (1.0, 1.0)
    assert bootstrap_ci([0.0, 1.0, 1.0], seed=3) == bootstrap_ci([0.0, 1.0, 1.0], seed=3)


def test_summarise_reports_n():
    assert summarise([1.0, 0.0, 1.0, 1.0])["n"] == 4
    assert math.isnan(summarise([])["mean"])


def test_stratified_interval_of_macro_mean():
    from moerge.eval.stats import stratified_ci

    low, high = stratified_ci([[1.0] * 10, [0.0, 1.0] * 50])
    assert low < 0.75 < high  # macro mean = (1.0 + 0.5) / 2
    assert stratified_ci([[1.0] * 5, [0.0] * 5]) == (0.5, 0.5)
