"""Merge methods against peft.utils.merge_utils on the same tensors, plus property tests."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils

from moerge.errors import MoergeError
from moerge.merge.methods import MERGE_METHODS, MergeParams, get_method, post_scale


def task_vectors(seed: int, n: int = 3, shape: tuple[int, int] = (24, 40)) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(n)]


def run(name: str, deltas: list[torch.Tensor], weights: list[float], **params: object) -> torch.Tensor:
    return get_method(name).fn(torch.stack(deltas), torch.tensor(weights), MergeParams(**params))


WEIGHTS = [0.7, 1.3, 0.4]


def test_task_arithmetic_and_linear_match_peft() -> None:
    deltas = task_vectors(0)
    expected = merge_utils.task_arithmetic(deltas, torch.tensor(WEIGHTS))
    torch.testing.assert_close(run("task_arithmetic", deltas, WEIGHTS), expected)
    normalised = torch.tensor(WEIGHTS) / sum(WEIGHTS)
    expected = merge_utils.task_arithmetic(deltas, normalised)
    torch.testing.assert_close(run("linear", deltas, WEIGHTS), expected)


@pytest.mark.parametrize("density", [0.0, 0.2, 0.55, 1.0])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_ties_matches_peft(density: float, sign: str) -> None:
    deltas = task_vectors(1)
    expected = merge_utils.ties(deltas, torch.tensor(WEIGHTS), density, sign)
    torch.testing.assert_close(run("ties", deltas, WEIGHTS, density=density, majority_sign=sign), expected)


@pytest.mark.parametrize("density", [0.1, 0.5])
def test_magnitude_prune_matches_peft(density: float) -> None:
    deltas = task_vectors(2)
    expected = merge_utils.magnitude_prune(deltas, torch.tensor(WEIGHTS), density)
    torch.testing.assert_close(run("magnitude_prune", deltas, WEIGHTS, density=density), expected)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_is_deterministic_and_equals_peft_under_the_same_seed(name: str) -> None:
    deltas = task_vectors(3)
    ours = run(name, deltas, WEIGHTS, density=0.3, seed=11)
    torch.testing.assert_close(run(name, deltas, WEIGHTS, density=0.3, seed=11), ours, rtol=0, atol=0)
    assert not torch.equal(run(name, deltas, WEIGHTS, density=0.3, seed=12), ours)
    torch.manual_seed(11)
    theirs = getattr(merge_utils, name)(deltas, torch.tensor(WEIGHTS), 0.3)
    torch.testing.assert_close(ours, theirs)


def test_dare_drop_rate_and_mean_are_preserved() -> None:
    ones = [torch.ones(400, 500)]
    merged = run("dare_linear", ones, [1.0], density=0.3, seed=0)
    assert abs(float((merged != 0).float().mean()) - 0.3) < 0.01
    assert abs(float(merged.mean()) - 1.0) < 0.02
    assert torch.allclose(merged[merged != 0], torch.tensor(1 / 0.3))


def test_breadcrumbs_drops_outliers_and_small_entries() -> None:
    alternating = torch.where(torch.arange(100) % 2 == 0, 1.0, -1.0)
    values = (torch.arange(1.0, 101.0) * alternating).reshape(10, 10)
    merged = run("breadcrumbs", [values], [2.0], density=0.5, gamma=0.1)
    kept = merged.abs()[merged != 0] / 2
    assert sorted(kept.tolist()) == [float(v) for v in range(41, 91)]  # top 10 dropped, next 50 kept
    torch.testing.assert_close(merged[merged != 0], 2 * values[merged != 0])


def test_slerp_endpoints_and_norm() -> None:
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(run("slerp", [a, b], [1.0, 0.0]), a)
    torch.testing.assert_close(run("slerp", [a, b], [0.0, 1.0]), b)
    half = run("slerp", [a, b], [1.0, 1.0])
    torch.testing.assert_close(half, torch.tensor([[2**-0.5, 2**-0.5]]))


def test_lines_scales_linearly_with_depth() -> None:
    params = MergeParams(lines_alpha=0.2, lines_beta=0.6, scaling=2.0)
    assert post_scale(replace(params, layer_fraction=0.0)) == pytest.approx(0.4)
    assert post_scale(replace(params, layer_fraction=0.5)) == pytest.approx(1.0)
    assert post_scale(params) == pytest.approx(1.6)
    assert get_method("lines").defaults == {"lines_alpha": 0.5, "lines_beta": 0.5}


def test_unknown_method_lists_the_known_ones() -> None:
    with pytest.raises(MoergeError, match=r"unknown merge method 'tie'.*known: .*breadcrumbs.*ties"):
        get_method("tie")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"density": 1.5}, "density"),
        ({"majority_sign": "mean"}, "majority_sign"),
        ({"lines_alpha": 0.5}, "lines_alpha/lines_beta"),
    ],
)
def test_bad_parameters_are_refused(params: dict[str, object], message: str) -> None:
    with pytest.raises(MoergeError, match=message):
        MergeParams(**params)


# --- properties ------------------------------------------------------------------------------------

SINGLE = [name for name, m in MERGE_METHODS.items() if m.experts is None]
shapes = st.tuples(st.integers(1, 12), st.integers(1, 12))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), shape=shapes, name=st.sampled_from(SINGLE))
def test_one_expert_with_weight_one_is_returned(seed: int, shape: tuple[int, int], name: str) -> None:
    (delta,) = task_vectors(seed, 1, shape)
    merged = run(name, [delta], [1.0], density=1.0, gamma=0.0, lines_alpha=None, lines_beta=None)
    torch.testing.assert_close(merged, delta)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(2, 5), shape=shapes, data=st.data())
def test_linear_is_order_independent(seed: int, n: int, shape: tuple[int, int], data: st.DataObject) -> None:
    deltas = task_vectors(seed, n, shape)
    weights = data.draw(st.lists(st.floats(0.1, 3.0), min_size=n, max_size=n))
    order = data.draw(st.permutations(range(n)))
    merged = run("linear", deltas, weights)
    shuffled = run("linear", [deltas[i] for i in order], [weights[i] for i in order])
    torch.testing.assert_close(shuffled, merged)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 5), shape=shapes)
def test_ties_density_one_agreeing_signs_is_average(seed: int, n: int, shape: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(seed)
    signs = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)
    deltas = [signs * (torch.rand(shape, generator=generator) + 0.1) for _ in range(n)]
    merged = run("ties", deltas, [1.0] * n, density=1.0)
    torch.testing.assert_close(merged, torch.stack(deltas).mean(dim=0))
