"""Merge methods against peft.utils.merge_utils on the same tensors, plus property tests."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils

from moerge.errors import MoergeError
from moerge.merge.methods import MERGE_METHODS, LinesOptions, magnitude_mask, post_scale


def task_vectors(seed: int, n: int = 3, shape: tuple[int, int] = (24, 40)) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(n)]


def run(name: str, deltas: list[torch.Tensor], weights: list[float], **params: object) -> torch.Tensor:
    method = MERGE_METHODS.get(name)
    return method.fn(torch.stack(deltas), torch.tensor(weights), method.parse_options(params))


WEIGHTS = [0.7, 1.3, 0.4]


def test_task_arithmetic_and_linear_match_peft() -> None:
    deltas = task_vectors(0)
    expected = merge_utils.task_arithmetic(deltas, torch.tensor(WEIGHTS))
    torch.testing.assert_close(run("task_arithmetic", deltas, WEIGHTS), expected)
    normalised = torch.tensor(WEIGHTS) / sum(WEIGHTS)
    expected = merge_utils.task_arithmetic(deltas, normalised)
    torch.testing.assert_close(run("linear", deltas, WEIGHTS), expected)


@pytest.mark.parametrize("density", [0.2, 0.55, 1.0])  # 0 is refused: it would merge nothing
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
    options = MERGE_METHODS.get("ties").parse_options({"lines_alpha": 0.2, "lines_beta": 0.6, "scaling": 2.0})
    assert post_scale(options, 0.0) == pytest.approx(0.4)
    assert post_scale(options, 0.5) == pytest.approx(1.0)
    assert post_scale(options, 1.0) == pytest.approx(1.6)
    assert MERGE_METHODS.get("lines").options is LinesOptions
    assert (LinesOptions().lines_alpha, LinesOptions().lines_beta) == (0.5, 0.5)


def test_unknown_method_lists_the_known_ones() -> None:
    with pytest.raises(MoergeError, match=r"unknown merge method 'tie'.*known: .*breadcrumbs.*ties"):
        MERGE_METHODS.get("tie")


def test_a_second_registration_is_refused() -> None:
    with pytest.raises(ValueError, match="merge method 'ties' is already registered"):
        MERGE_METHODS.register("ties", MERGE_METHODS.get("ties"))


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("ties", {"density": 1.5}, "parameters.density: Input should be less than or equal to 1"),
        ("ties", {"density": 0}, "parameters.density: Input should be greater than 0"),
        ("dare_ties", {"density": 0.0}, "parameters.density: Input should be greater than 0"),
        ("linear", {"scaling": 0}, "parameters.scaling: must not be 0"),
        ("linear", {"scaling": float("nan")}, "parameters.scaling: Input should be a finite number"),
        ("lines", {"lines_beta": float("inf")}, "parameters.lines_beta: Input should be a finite number"),
        ("ties", {"majority_sign": "mean"}, "parameters.majority_sign: Input should be 'total' or 'frequency'"),
        ("linear", {"lines_alpha": 0.5}, "lines_alpha/lines_beta: give both or neither"),
        ("breadcrumbs", {"gamma": 1.0}, "parameters.gamma: Input should be less than 1"),
        (
            "linear",
            {"density": 0.2},
            r"density: not an option of merge method 'linear' \(its options: scaling, lines_alpha, lines_beta\)",
        ),
        ("dare_linear", {"majority_sign": "total"}, "not an option of merge method 'dare_linear'"),
        ("ties", {"seed": 1}, "parameters.seed: not an option of merge method 'ties'"),
    ],
)
def test_bad_parameters_are_refused(method: str, params: dict[str, object], message: str) -> None:
    with pytest.raises(MoergeError, match=message):
        MERGE_METHODS.get(method).parse_options(params)


def test_every_option_is_described() -> None:
    """--help and the README tables are generated from these descriptions."""
    for name, method in MERGE_METHODS.items():
        assert method.summary, name
        for option, field in method.options.model_fields.items():
            assert field.description and len(field.description) > 20, f"{name}.{option}"


# --- exact-k magnitude masks -----------------------------------------------------------------------


def tied_task_vectors() -> list[torch.Tensor]:
    """Few distinct magnitudes, so the k-th largest is shared by many entries."""
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(-2, 3, (24, 40), generator=generator).float() for _ in range(3)]


@pytest.mark.parametrize("density", [0.1, 0.3, 0.55])
def test_magnitude_mask_keeps_exactly_k_entries_among_ties(density: float) -> None:
    deltas = torch.stack(tied_task_vectors())
    mask = magnitude_mask(deltas, density)
    k = int(density * 24 * 40)
    assert mask.reshape(3, -1).sum(dim=1).tolist() == [k, k, k]
    for delta, kept in zip(deltas, mask, strict=True):  # nothing dropped is larger than anything kept
        assert delta.abs()[~kept].max() <= delta.abs()[kept].min()


@pytest.mark.parametrize("density", [0.1, 0.3, 0.55])
def test_tied_magnitudes_match_peft_magnitude_prune_and_ties(density: float) -> None:
    deltas = tied_task_vectors()
    ours = run("magnitude_prune", deltas, WEIGHTS, density=density)
    theirs = merge_utils.magnitude_prune(deltas, torch.tensor(WEIGHTS), density)
    assert torch.equal(ours != 0, theirs != 0)
    torch.testing.assert_close(ours, theirs)
    for sign in ("total", "frequency"):
        ours = run("ties", deltas, WEIGHTS, density=density, majority_sign=sign)
        theirs = merge_utils.ties(deltas, torch.tensor(WEIGHTS), density, sign)
        assert torch.equal(ours != 0, theirs != 0)
        torch.testing.assert_close(ours, theirs)


# --- properties ------------------------------------------------------------------------------------

FLATTENED = {"iso_c", "iso_cts"}  # isotropic merges flatten even one expert's spectrum (see test_merge_svd_methods)
SINGLE = [name for name, m in MERGE_METHODS.items() if m.experts is None and name not in FLATTENED]
KEEP_ALL = {"density": 1.0, "gamma": 0.0, "lines_alpha": None, "lines_beta": None}
shapes = st.tuples(st.integers(1, 12), st.integers(1, 12))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), shape=shapes, name=st.sampled_from(SINGLE))
def test_one_expert_with_weight_one_is_returned(seed: int, shape: tuple[int, int], name: str) -> None:
    (delta,) = task_vectors(seed, 1, shape)
    fields = MERGE_METHODS.get(name).options.model_fields
    merged = run(name, [delta], [1.0], **{k: v for k, v in KEEP_ALL.items() if k in fields})
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
