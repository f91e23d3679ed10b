"""GRPO stages: group advantages and the clipped loss against direct computations, reward function
errors, and an SFT → GRPO recipe on the tiny model."""

import math
import sys

import pytest
import torch

from helpers import addition_rows, write_task
from moerge.data.task import Example
from moerge.errors import MoergeError
from moerge.library.expert import read_expert_meta, verify_expert_files
from moerge.library.loading import load_model
from moerge.recipes.train import train_expert
from moerge.train import TrainConfig, reinforce
from moerge.train.config import staged_from_dict
from moerge.train.reinforce import call_reward, group_advantages, grpo_loss, load_reward


def test_group_advantages_equal_the_direct_computation():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, 1.0, 2.0, 0.0]
    ours = group_advantages(torch.tensor(rewards), 4)
    expected = []
    for g in range(3):
        group = rewards[4 * g : 4 * g + 4]
        mean = sum(group) / 4
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 3)
        expected += [(r - mean) / (std + 1e-4) for r in group]
    torch.testing.assert_close(ours, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    assert torch.all(ours[4:8] == 0)  # a group whose answers all score the same teaches nothing


@pytest.mark.parametrize("beta", [0.0, 0.2])
def test_clipped_loss_and_kl_equal_the_direct_computation(beta):
    torch.manual_seed(0)
    logps = (torch.randn(3, 4) - 2).requires_grad_()
    old = logps.detach() + torch.tensor([[0.5, -0.5, 0.05, 0.0]] * 3)  # ratios outside and inside the clip
    ref = logps.detach() + 0.3 * torch.randn(3, 4)
    adv = torch.tensor([1.5, -0.7, 0.2])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    clip = 0.2

    loss, kl = grpo_loss(logps, old, adv, mask, clip=clip, beta=beta, ref_logps=ref)

    seqs, kls = [], []
    for i in range(3):
        terms, kl_terms = [], []
        for t in range(4):
            if not mask[i, t]:
                continue
            ratio = torch.exp(logps[i, t] - old[i, t])
            r, a = float(ratio.detach()), float(adv[i])
            if (a > 0 and r > 1 + clip) or (a < 0 and r < 1 - clip):  # the clip binds: a constant, no gradient
                surrogate = torch.tensor(min(max(r, 1 - clip), 1 + clip) * a)
            else:
                surrogate = ratio * adv[i]
            d = float(ref[i, t] - logps[i, t].detach())
            k = math.exp(d) - d - 1
            terms.append(-surrogate + beta * (torch.exp(ref[i, t] - logps[i, t]) - (ref[i, t] - logps[i, t]) - 1))
            kl_terms.append(k)
        seqs.append(torch.stack(terms).mean())
        kls.append(sum(kl_terms) / len(kl_terms))
    expected = torch.stack(seqs).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert kl.item() == pytest.approx(sum(kls) / 3, rel=1e-5)
    (ours_grad,) = torch.autograd.grad(loss, logps)
    (expected_grad,) = torch.autograd.grad(expected, logps)
    torch.testing.assert_close(ours_grad, expected_grad, rtol=1e-5, atol=1e-7)
    if beta == 0:  # ratio e^0.5 > 1.2 with A > 0 is clipped (no gradient); e^-0.5 is not
        assert ours_grad[0, 1] == 0 and ours_grad[0, 0] != 0


def test_reward_function_errors_are_one_line_naming_it(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def boom(completion, example):\n    raise ValueError('no answer\\nfound')\n"
        "def text(completion, example):\n    return 'high'\n"
        "def length(completion, example):\n    return float(len(completion))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    task = type("T", (), {"name": "t", "scorer": staticmethod(lambda c, e: 1.0)})()
    example = Example("q", "a")
    name, fn = load_reward("my_rewards:length", task)
    assert call_reward(name, fn, "abc", example) == 3.0
    with pytest.raises(MoergeError, match=r"reward function my_rewards:boom failed: ValueError") as err:
        call_reward(*load_reward("my_rewards:boom", task), "x", example)
    assert "\n" not in str(err.value).split(": ", 1)[0]
    with pytest.raises(MoergeError, match=r"reward function my_rewards:text returned 'high'; expected a number"):
        call_reward(*load_reward("my_rewards:text", task), "x", example)
    with pytest.raises(MoergeError, match=r"module 'my_rewards' has no function 'nope'"):
        load_reward("my_rewards:nope", task)
    with pytest.raises(MoergeError, match=r"reward: cannot import 'no_such_module_xyz'"):
        load_reward("no_such_module_xyz:f", task)
    with pytest.raises(MoergeError, match=r"expected `module:function`"):
        load_reward("my_rewards", task)
    sys.modules.pop("my_rewards", None)


def test_sft_then_grpo_recipe_logs_and_writes_an_expert(tmp_path, tiny_base, monkeypatch):
    task = write_task(tmp_path / "add.jsonl", addition_rows(40))
    common = {"batch_size": 2, "max_length": 48, "eval_limit": 2, "lr": 5e-3}
    recipe = staged_from_dict(
        {
            "base": str(tiny_base),
            "task": task,
            "method": "lora",
            "stages": [
                {"name": "sft", "steps": 2, **common},
                {"name": "rl", "type": "grpo", "steps": 2, "group_size": 3, "max_new_tokens": 4, "beta": 0.1, **common},
            ],
        }
    )
    kls = []
    real = reinforce.grpo_loss

    def recording(*args, **kw):
        loss, kl = real(*args, **kw)
        kls.append((kw["ref_logps"], args[0].detach()))
        return loss, kl

    monkeypatch.setattr(reinforce, "grpo_loss", recording)
    train_expert(recipe, tmp_path / "expert", progress=False)

    out = tmp_path / "expert"
    assert verify_expert_files(out) == []
    meta = read_expert_meta(out)
    rl = meta.stages[1]
    assert rl["type"] == "grpo"
    log = rl["hyperparameters"]["log"]
    assert set(log) == {"mean_reward", "reward_std", "kl", "completion_length"}
    assert all(len(v) == 2 for v in log.values())
    assert all(0 <= r <= 1 for r in log["mean_reward"]) and all(1 <= n <= 4 for n in log["completion_length"])
    # At the first step the policy is the reference (the SFT expert): the KL is zero there.
    ref0, logps0 = kls[0]
    torch.testing.assert_close(ref0, logps0, rtol=1e-5, atol=1e-5)
    assert log["kl"][0] == pytest.approx(0.0, abs=1e-6)
    model, _ = load_model(str(tiny_base), out, device="cpu")
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


def test_a_grpo_stage_needs_a_task(tiny_base):
    with pytest.raises(ValueError, match="grpo stage needs `task`"):
        TrainConfig(base=str(tiny_base), type="grpo", tasks=["a.jsonl", "b.jsonl"])
