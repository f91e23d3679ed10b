"""Multi-task mixing: samplers draw tasks in the stated proportions; per-task loss averaging; logging."""

from collections import Counter

import pytest
import torch

from helpers import addition_rows, parity_rows, write_task
from moerge.errors import MoergeError
from moerge.recipes.train import train_expert
from moerge.train import TrainConfig
from moerge.train.data import MixtureSampler, mixing_probs
from moerge.train.loop import batch_loss

SIZES = [10, 40, 160]


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(base="b", tasks=["a", "b", "c"], **kw)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"mixing": "proportional"}, [10 / 210, 40 / 210, 160 / 210]),
        ({"mixing": "temperature", "temperature": 2.0}, [1 / 7, 2 / 7, 4 / 7]),  # sqrt(10·(1, 4, 16))
        ({"mixing": "temperature", "temperature": 1e9}, [1 / 3, 1 / 3, 1 / 3]),
        ({"mixing": "weights", "weights": [3, 1, 1]}, [0.6, 0.2, 0.2]),
    ],
)
def test_sampler_draws_tasks_in_the_stated_proportions(settings, expected):
    probs = mixing_probs(SIZES, _cfg(**settings))
    assert probs == pytest.approx(expected, rel=1e-6)
    sampler = MixtureSampler(SIZES, probs, batch_size=8, seed=5)
    offsets = [0, 10, 50]
    draws = Counter(
        next(t for t in reversed(range(3)) if i >= offsets[t]) for step in range(1500) for i in sampler.batch(step)
    )
    n = 1500 * 8
    for t, p in enumerate(expected):
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(draws[t] / n - p) < 5 * sigma + 1e-9, (t, draws[t] / n, p)


def test_sampler_covers_each_task_evenly_and_replays_the_same_batches():
    sampler = MixtureSampler(SIZES, [1 / 3] * 3, batch_size=8, seed=1)
    seen = [i for step in range(200) for i in sampler.batch(step)]
    small = Counter(i for i in seen if i < 10)
    assert max(small.values()) - min(small.values()) <= 1  # per-epoch permutations, not i.i.d. draws
    fresh = MixtureSampler(SIZES, [1 / 3] * 3, batch_size=8, seed=1)
    assert fresh.batch(150) == sampler.batch(150)  # a resumed run sees the same batch
    assert MixtureSampler(SIZES, [1 / 3] * 3, batch_size=8, seed=2).batch(0) != sampler.batch(0)


def test_mixing_settings_are_checked():
    with pytest.raises(ValueError, match="weights"):
        _cfg(mixing="weights")
    with pytest.raises(ValueError, match="exactly one"):
        TrainConfig(base="b", task="x", tasks=["y"])


def test_per_task_loss_averages_each_task_then_the_tasks(tiny_base):
    from moerge.models import load_base

    model, _ = load_base(tiny_base)
    ids = torch.randint(3, 200, (3, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[2, 4:9] = -100  # row 2 (task 1) has one answer token only: small task
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    every_token, by_task = batch_loss(model, batch, [0, 0, 1], per_task=False)
    balanced, _ = batch_loss(model, batch, [0, 0, 1], per_task=True)
    with torch.no_grad():
        reference = model(**batch).loss
        task0 = model(input_ids=ids[:2], labels=labels[:2]).loss
        task1 = model(input_ids=ids[2:], labels=labels[2:]).loss
    torch.testing.assert_close(every_token, reference)
    assert by_task == pytest.approx({0: float(task0), 1: float(task1)}, rel=1e-5)
    torch.testing.assert_close(balanced, (task0 + task1) / 2)


def test_multitask_training_logs_each_task(tiny_base, tmp_path):
    tasks = [
        write_task(tmp_path / "parity.jsonl", parity_rows(60)),
        write_task(tmp_path / "add.jsonl", addition_rows(20)),
    ]
    cfg = TrainConfig(
        base=str(tiny_base),
        tasks=tasks,
        mixing="temperature",
        per_task_loss=True,
        steps=4,
        batch_size=8,
        max_length=48,
        lr=5e-3,
        eval_limit=2,
    )
    meta = train_expert(cfg, tmp_path / "mt", progress=False)
    assert set(meta.metrics["train_loss_by_task"]) == {"parity", "add"}
    assert set(meta.metrics["tasks"]) == {"parity", "add"} and meta.metrics["test"]["n"] == 4
    assert meta.hyperparameters["mixing"] == "temperature" and meta.hyperparameters["per_task_loss"] is True
    assert [t["name"] for t in meta.task.tasks] == ["parity", "add"]
    with pytest.raises(MoergeError, match="weights"):
        from moerge.train.config import config_from_dict

        config_from_dict({"base": "b", "tasks": tasks, "mixing": "weights", "weights": [1]})
