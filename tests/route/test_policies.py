"""Selection policies and pooling, against hand-computed expectations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from moerge.errors import MoergeError
from moerge.route.policies import Policy, parse_policy, pool_examples, pool_tasks, register_selector
from moerge.yamlconf import Source


def test_top_k_softmax_over_selected():
    scores = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    w = Policy("top_k", k=2).select(scores)
    expected = torch.softmax(torch.tensor([3.0, 2.0]), 0)
    torch.testing.assert_close(w, torch.tensor([[0.0, expected[0], expected[1], 0.0]]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-4, 4), min_size=2, max_size=8), st.floats(0.05, 1.0))
def test_top_p_keeps_smallest_set_reaching_p(raw, p):
    scores = torch.tensor([raw], dtype=torch.float64)
    probs = torch.softmax(scores, -1)[0]
    kept = Policy("top_p", p=p).select(scores)[0] > 0
    n = int(kept.sum())
    top = probs.sort(descending=True).values
    assert n >= 1
    assert top[:n].sum() >= p - 1e-9 or n == len(raw)  # the kept set reaches p...
    assert n == 1 or top[: n - 1].sum() < p  # ...and no smaller set does
    assert probs[kept].min() >= probs[~kept].max() if (~kept).any() else True


def test_top_p_example():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert (Policy("top_p", p=0.8).select(scores)[0] > 0).tolist() == [True, True, False, False]
    assert (Policy("top_p", p=0.81).select(scores)[0] > 0).tolist() == [True, True, True, False]
    assert (Policy("top_p", p=0.1).select(scores)[0] > 0).tolist() == [True, False, False, False]


def test_threshold_and_dense():
    scores = torch.log(torch.tensor([[0.6, 0.25, 0.1, 0.05]]))
    w = Policy("threshold", threshold=0.2).select(scores)
    torch.testing.assert_close(w, torch.tensor([[0.6, 0.25, 0.0, 0.0]]) / 0.85)
    assert (Policy("threshold", threshold=0.99).select(scores)[0] > 0).sum() == 1
    torch.testing.assert_close(Policy("dense").select(scores), torch.tensor([[0.6, 0.25, 0.1, 0.05]]))


def test_minus_inf_scores_never_selected():
    scores = torch.tensor([[float("-inf"), 1.0, float("-inf")]])
    torch.testing.assert_close(Policy("top_k", k=2).select(scores), torch.tensor([[0.0, 1.0, 0.0]]))
    assert torch.isfinite(Policy("dense").select(torch.full((1, 3), float("-inf")))).all()


def test_pool_examples_ignores_padding():
    scores = torch.tensor([[[9.0, 9.0], [1.0, 3.0], [3.0, 5.0]]])
    mask = torch.tensor([[0, 1, 1]])
    torch.testing.assert_close(pool_examples(scores, mask), torch.tensor([[2.0, 4.0]]))


def test_pool_tasks_averages_per_task():
    scores = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 5.0]])
    out = pool_tasks(scores, ["a", "a", "b"])
    torch.testing.assert_close(out, torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 5.0]]))
    with pytest.raises(MoergeError, match="task ids"):
        pool_tasks(scores, None)


def test_bad_policy_is_user_error():
    with pytest.raises(MoergeError, match="unknown"):
        Policy("top_q")
    with pytest.raises(MoergeError, match="merge"):
        Policy("top_k", granularity="token", aggregation="merge")


def test_policy_from_data_names_the_file_and_field():
    with pytest.raises(
        MoergeError, match=r"^r\.yaml: policy\.kk: not an option of the selection policy \(its options: name, k,"
    ):
        parse_policy({"kk": 1}, Source("r.yaml").at("policy"))
    with pytest.raises(MoergeError, match=r"^policy: name: unknown selection policy 'top_q'; did you mean 'top_p'\?"):
        parse_policy({"name": "top_q"})
    assert Policy(**Policy("top_p", p=0.5).to_dict()) == parse_policy({"name": "top_p", "p": 0.5})
    assert Policy("top_k", k=1).updated({"k": None, "granularity": "example"}) == Policy(k=1, granularity="example")


def test_second_selector_under_a_name_is_refused():
    with pytest.raises(ValueError, match="selection policy 'dense' is already registered"):
        register_selector("dense", most=lambda policy, experts: experts)(lambda probs, policy: probs > 0)


@pytest.mark.parametrize(
    ("policy", "most"),
    [
        (Policy("top_k", k=2), 2),
        (Policy("top_k", k=9), 4),
        (Policy("dense"), 4),
        (Policy("top_p", p=0.5), 2),
        (Policy("top_p", p=0.9), 4),
        (Policy("threshold", threshold=0.3), 3),
        (Policy("threshold", threshold=0.6), 1),
        (Policy("threshold", threshold=0.0), 4),
    ],
)
def test_max_experts_per_policy(policy, most):
    assert policy.max_experts(4) == most


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.floats(-4, 4), min_size=1, max_size=8),
    st.sampled_from(["top_k", "top_p", "threshold", "dense"]),
    st.floats(0.05, 1.0),
)
def test_max_experts_bounds_what_any_row_keeps(raw, name, value):
    """What `Routing.parameter_counts` calls active is never less than what a row really uses
    (threshold keeps every expert tied for the best, which the bound leaves out)."""
    scores = torch.tensor([raw], dtype=torch.float64)
    probs = torch.softmax(scores, -1)[0]
    assume(name != "threshold" or int((probs == probs.max()).sum()) == 1)
    policy = Policy(name, k=max(1, round(value * 4)), p=value, threshold=value)
    kept = int((policy.select(scores)[0] > 0).sum())
    assert kept <= policy.max_experts(len(raw))
