"""Example-level routers in the shared batch: a `centroid` request is routed once on its prompt and its
row decodes next to expert and base rows, reading its experts with the router's weights. Its answer,
routing decision and per-token explanation equal those of the same router served alone from the model
pool (today's path for every router), token for token.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_batching import EXPERTS, Ask, Run, drive, expected_steps, served  # noqa: F401  (served: a fixture)

from moerge.data.task import Example
from moerge.serve.batch import ExpertStack
from moerge.serve.engine import Result
from moerge.serve.models import ModelPool

# each expert's "training inputs": different enough that different prompts pick different experts
DATA = {
    "a": ["apples and pears", "an apple a day", "apple pie recipe"],
    "b": ["0 1 2 3 4 5 6 7", "99 + 13 = 112", "7 * 8 * 9"],
    "c": ["ZZZZ QQQQ XXXX", "QXZ QXZ QXZ", "XXXXXXXXXX"],
}


@pytest.fixture(scope="module")
def routers(served, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    """A top-1 centroid router (its default policy) and a top-2 one whose rows mix two experts."""
    from moerge.route import build_router

    base, library = served
    root = tmp_path_factory.mktemp("routers")
    data = {name: [Example(text, "") for text in texts] for name, texts in DATA.items()}
    experts = {n: library.path(n) for n in EXPERTS}
    return {
        "centroid": build_router("centroid", experts, root / "top1", base=base, data=data),
        "mixing": build_router(
            "centroid", experts, root / "top2", base=base, data=data, policy={"k": 2, "temperature": 1.0}
        ),
        "arrow": build_router("arrow", experts, root / "arrow", base=base),
    }


def _outcome(run: Run, i: int) -> tuple:
    result = run.results[i]
    assert isinstance(result, Result), result
    return [(c.text, c.tokens, c.finish_reason, c.explained) for c in result.choices], result.routing


def test_routed_rows_join_the_batch_and_answer_as_the_router_alone(served, routers, monkeypatch):  # noqa: F811
    base, library = served
    plan = [
        (0, Ask("a", "hello there", 16)),
        (0, Ask("centroid", "apple pie with apples", 14)),
        (2, Ask("centroid", "QQQQ ZZZZ XXXX", 10, explain=True)),
        (2, Ask("mixing", "12 + 34 = 46", 12)),
        (3, Ask("base", "a longer prompt than the others, so padding moves", 8)),
        (5, Ask("mixing", "apples", 6, n=2)),
        (6, Ask("centroid", "7 8 9", 1)),  # done after its prefill: never in a decoding step
    ]

    def pool() -> ModelPool:
        return ModelPool(base=str(base), library=library, routers={n: routers[n] for n in ("centroid", "mixing")})

    batched = drive(pool(), plan)
    with monkeypatch.context() as patch:  # routers served alone from the pool, as before
        patch.setattr(ExpertStack, "router_of", lambda self, name: None)
        alone = drive(pool(), plan)
    assert [_outcome(batched, i) for i in range(len(plan))] == [_outcome(alone, i) for i in range(len(plan))]

    # the routed rows were decoded in the shared batch, each step counting them
    answers = [batched.answers(i) for i in range(len(plan))]
    assert batched.steps == expected_steps(plan, answers)
    assert max(batched.steps) >= 5
    # the routers really chose: different experts for different prompts, two experts in a mixing row
    top1 = [max(batched.results[i].routing.items(), key=lambda kv: kv[1])[0] for i in (1, 2, 6)]
    assert len(set(top1)) >= 2
    assert sum(w > 0 for w in batched.results[3].routing.values()) == 2
    explained = batched.results[2].choices[0].explained
    assert [t["weights"] for t in explained] == [batched.results[2].routing] * len(explained)


def test_token_level_and_foreign_routers_stay_in_the_pool(served, routers, tmp_path):  # noqa: F811
    """Arrow scores every token; a router over an expert the library does not hold cannot be stacked."""
    from moerge.route import build_router

    base, library = served
    outside = shutil.copytree(library.path("a"), tmp_path / "outside")  # the same expert, outside the library
    data = {"outside": [Example("x", "")], "b": [Example("y", "")]}
    foreign = build_router(
        "centroid", {"outside": outside, "b": library.path("b")}, tmp_path / "r", base=base, data=data
    )
    pool = ModelPool(
        base=str(base),
        library=library,
        routers={"arrow": routers["arrow"], "foreign": foreign, "centroid": routers["centroid"]},
    )
    stack = ExpertStack(pool)
    assert [stack.accepts(n) for n in ("arrow", "foreign", "centroid")] == [False, False, True]
    assert stack.router_of("centroid").experts == list(EXPERTS)
