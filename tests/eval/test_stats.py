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


# ---- paired comparisons ----------------------------------------------------------------------------------


def _exact_mcnemar(discordant_a: int, discordant_b: int) -> float:
    """Independent reference: two-sided exact binomial test on the discordant pairs, by math.comb."""
    m = discordant_a + discordant_b
    k = min(discordant_a, discordant_b)
    return min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2**m)


def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs():
    from moerge.eval.stats import mcnemar

    # 20 examples: both right on 6, both wrong on 5, only a right on 7, only b right on 2
    a = [1.0] * 6 + [0.0] * 5 + [1.0] * 7 + [0.0] * 2
    b = [1.0] * 6 + [0.0] * 5 + [0.0] * 7 + [1.0] * 2
    result = mcnemar(a, b)
    assert (result["a_only"], result["b_only"]) == (7, 2)
    assert result["p"] == pytest.approx(_exact_mcnemar(7, 2)) and result["p"] == pytest.approx(2 * 46 / 512)
    assert mcnemar(b, a)["p"] == pytest.approx(result["p"])  # two-sided: symmetric
    assert mcnemar(a, a) == {"a_only": 0, "b_only": 0, "p": 1.0}  # no discordant pair, no evidence


def test_mcnemar_on_graded_scores_is_the_sign_test():
    from moerge.eval.stats import mcnemar

    a = [0.9, 0.5, 0.7, 0.2, 0.6, 0.6]
    b = [0.1, 0.4, 0.7, 0.3, 0.5, 0.55]  # a higher on 4, lower on 1, tied on 1 (dropped)
    result = mcnemar(a, b)
    assert (result["a_only"], result["b_only"]) == (4, 1)
    assert result["p"] == pytest.approx(_exact_mcnemar(4, 1))


def test_paired_bootstrap_matches_the_normal_approximation_of_the_paired_difference():
    from moerge.eval.stats import paired_bootstrap

    # 400 examples: a alone right on 60, b alone right on 30, the rest concordant
    a = [1.0] * 60 + [0.0] * 30 + [1.0] * 150 + [0.0] * 160
    b = [0.0] * 60 + [1.0] * 30 + [1.0] * 150 + [0.0] * 160
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(diffs) / len(diffs)
    se = statistics.pstdev(diffs) / math.sqrt(len(diffs))
    result = paired_bootstrap(a, b, resamples=20_000)
    assert result["diff"] == pytest.approx(0.075) and result["n"] == 400
    assert result["ci_low"] == pytest.approx(mean - 1.96 * se, abs=0.005)
    assert result["ci_high"] == pytest.approx(mean + 1.96 * se, abs=0.005)
    normal_p = math.erfc(abs(mean / se) / math.sqrt(2))  # ≈ 0.0015
    assert result["p"] == pytest.approx(normal_p, abs=0.002)


def test_paired_difference_is_significant_where_the_unpaired_intervals_overlap():
    from moerge.eval.stats import mcnemar, paired_bootstrap

    # b gets right exactly the examples a gets right, except 8: a = 0.60, b = 0.52
    a = [1.0] * 60 + [0.0] * 40
    b = [1.0] * 52 + [0.0] * 48
    a_low, _ = bootstrap_ci(a)
    _, b_high = bootstrap_ci(b)
    assert a_low < b_high  # the two unpaired 95% intervals overlap: read apart, no difference shows
    paired = paired_bootstrap(a, b)
    assert paired["diff"] == pytest.approx(0.08)
    assert paired["ci_low"] > 0 and paired["p"] < 0.01
    assert mcnemar(a, b)["p"] == pytest.approx(_exact_mcnemar(8, 0)) and mcnemar(a, b)["p"] == 2 / 2**8


def test_bootstrap_p_values_at_the_extremes():
    from moerge.eval.stats import paired_bootstrap

    same = paired_bootstrap([1.0, 0.0, 1.0], [1.0, 0.0, 1.0], resamples=999)
    assert (same["diff"], same["ci_low"], same["ci_high"], same["p"]) == (0.0, 0.0, 0.0, 1.0)
    always = paired_bootstrap([1.0] * 10, [0.0] * 10, resamples=999)
    assert (always["ci_low"], always["ci_high"]) == (1.0, 1.0) and always["p"] == pytest.approx(2 / 1000)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_bootstrap([1.0], [1.0, 0.0])


def test_stratified_paired_bootstrap_weighs_tasks_equally_and_resamples_within_each():
    from moerge.eval.stats import stratified_paired_bootstrap

    # task 1 (10 examples): a = b everywhere; task 2 (200 examples): a beats b on every example.
    # Macro difference: (0 + 1) / 2 = 0.5 on every resample (pooled it would be 200 / 210).
    pairs = [([1.0, 0.0] * 5, [1.0, 0.0] * 5), ([1.0] * 200, [0.0] * 200)]
    result = stratified_paired_bootstrap(pairs, resamples=2000)
    assert (result["diff"], result["ci_low"], result["ci_high"]) == (0.5, 0.5, 0.5) and result["n"] == 210


def test_stratified_interval_matches_the_normal_approximation_of_the_macro_difference():
    from moerge.eval.stats import stratified_paired_bootstrap

    t1 = ([1.0] * 20 + [0.0] * 10 + [1.0] * 40 + [0.0] * 30, [0.0] * 20 + [1.0] * 10 + [1.0] * 40 + [0.0] * 30)
    t2 = ([1.0] * 12 + [0.0] * 4 + [0.0] * 184, [0.0] * 12 + [1.0] * 4 + [0.0] * 184)
    per_task = [[x - y for x, y in zip(a, b, strict=True)] for a, b in (t1, t2)]
    mean = sum(sum(d) / len(d) for d in per_task) / 2  # (0.10 + 0.04) / 2
    se = math.sqrt(sum(statistics.pvariance(d) / len(d) for d in per_task)) / 2
    result = stratified_paired_bootstrap([t1, t2], resamples=20_000)
    assert result["diff"] == pytest.approx(0.07)
    assert result["ci_low"] == pytest.approx(mean - 1.96 * se, abs=0.006)
    assert result["ci_high"] == pytest.approx(mean + 1.96 * se, abs=0.006)


def test_paired_matrix_gives_every_pair_its_own_paired_bootstrap():
    from moerge.eval.stats import paired_matrix, stratified_paired_bootstrap

    tasks = {
        "t1": {"x": [1.0, 1.0, 0.0, 1.0, 0.0, 1.0], "y": [0.0, 1.0, 0.0, 0.0, 0.0, 1.0], "z": [1.0] * 6},
        "t2": {"x": [0.0, 1.0, 1.0, 0.0], "y": [1.0, 1.0, 0.0, 0.0], "z": [0.0, 0.0, 0.0, 1.0]},
        "t3": {"x": [1.0, 0.0, 1.0], "z": [0.0, 0.0, 1.0]},  # y was not scored on t3
    }
    found = paired_matrix(tasks, [("x", "y"), ("x", "z"), ("z", "y")], resamples=3000, seed=4)
    assert found[("x", "y")]["tasks"] == ["t1", "t2"] and found[("x", "z")]["tasks"] == ["t1", "t2", "t3"]
    for (p, q), stats in found.items():
        shared = stats["tasks"]
        means = [sum(tasks[t][p]) / len(tasks[t][p]) - sum(tasks[t][q]) / len(tasks[t][q]) for t in shared]
        assert stats["diff"] == pytest.approx(sum(means) / len(shared))
        # one set of resamples per task, shared by all models, is the pair's own paired bootstrap: with the
        # same seed and the tasks in the same order, the very same draws
        alone = stratified_paired_bootstrap([(tasks[t][p], tasks[t][q]) for t in shared], resamples=3000, seed=4)
        assert (stats["ci_low"], stats["ci_high"], stats["p"]) == pytest.approx(
            (alone["ci_low"], alone["ci_high"], alone["p"])
        )
    turned = paired_matrix(tasks, [("y", "x")], resamples=3000, seed=4)[("y", "x")]
    assert (turned["diff"], turned["ci_low"], turned["ci_high"]) == pytest.approx(
        (-found[("x", "y")]["diff"], -found[("x", "y")]["ci_high"], -found[("x", "y")]["ci_low"])
    )


def test_holm_against_a_hand_computation():
    from moerge.eval.stats import holm

    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → kept non-decreasing: 0.06
    adjusted, rejected = holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert rejected == [True, False, False, True]
    # Holm rejects all three where Bonferroni (×3: 0.036, 0.06, 0.12) rejects one
    adjusted, rejected = holm([0.012, 0.02, 0.04])
    assert adjusted == pytest.approx([0.036, 0.04, 0.04]) and rejected == [True, True, True]
    assert holm([0.5, 0.9]) == ([1.0, 1.0], [False, False])  # capped at 1
    assert holm([]) == ([], [])
