"""MeZO: one update equals the two-forward finite-difference estimate along the seed's direction,
weights outside the trained set never move, and a run is an ordinary resumable method."""

import pytest
import torch
from safetensors.torch import load_file

from helpers import parity_rows, write_task
from moerge.data.formats import MOERGE
from moerge.data.prompts import Encoded, collate, encode_for_training
from moerge.data.task import Example
from moerge.library.expert import read_expert_meta, verify_expert_files
from moerge.library.loading import load_model
from moerge.models import load_base
from moerge.models.logits import answer_loss
from moerge.recipes.train import train_expert
from moerge.train import TrainConfig, zeroth


def _batch(tokenizer) -> dict:
    rows = parity_rows(6)
    items: list[Encoded] = [encode_for_training(tokenizer, Example(r["input"], r["target"]), 48, MOERGE) for r in rows]
    return collate(items, tokenizer.pad_token_id)


def test_update_equals_the_finite_difference_estimate(tiny_base):
    model, tokenizer = load_base(str(tiny_base), device="cpu")
    model.eval()
    batch = _batch(tokenizer)
    names = [n for n, _ in model.named_parameters() if "layers.0." in n and ("q_proj" in n or "down_proj" in n)]
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seed, eps, lr = 1234, 1e-3, 0.05

    def loss_fn() -> float:
        return float(answer_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"]))

    # The direct computation: z from the seed, the loss at θ0 ± εz set explicitly, the SGD step along z.
    generator = torch.Generator().manual_seed(seed)
    z = [torch.randn(p.shape, generator=generator) for p in params]
    with torch.no_grad():
        for p, zi, n in zip(params, z, names, strict=True):
            p.copy_(before[n] + eps * zi)
        plus = loss_fn()
        for p, zi, n in zip(params, z, names, strict=True):
            p.copy_(before[n] - eps * zi)
        minus = loss_fn()
        for p, n in zip(params, names, strict=True):
            p.copy_(before[n])
    estimate = (plus - minus) / (2 * eps)
    expected = {n: before[n] - lr * estimate * zi for n, zi in zip(names, z, strict=True)}

    grad, loss_plus, loss_minus = zeroth.mezo_step(params, loss_fn, seed, eps=eps, lr=lr)

    assert loss_plus == pytest.approx(plus, abs=1e-6) and loss_minus == pytest.approx(minus, abs=1e-6)
    assert grad == pytest.approx(estimate, rel=1e-3, abs=1e-3)
    assert abs(estimate) > 1e-3  # the step is not a no-op the test could not tell apart
    for name, param in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(param.detach(), expected[name], rtol=0, atol=1e-5)
            assert not torch.equal(param.detach(), before[name])
        else:
            assert torch.equal(param.detach(), before[name]), name  # never perturbed
        assert param.grad is None  # no gradient stored


def test_perturbations_cancel_for_a_fixed_seed():
    """θ + εz − 2εz + εz is θ again (up to rounding): the noise is regenerated, not stored."""
    params = [torch.randn(5, 3), torch.randn(7)]
    start = [p.clone() for p in params]
    for scale in (1e-3, -2e-3, 1e-3):
        zeroth.perturb(params, 99, scale)
    for p, s in zip(params, start, strict=True):
        torch.testing.assert_close(p, s, rtol=0, atol=1e-6)


def _cfg(base, task, **kw) -> TrainConfig:
    settings = {"steps": 6, "batch_size": 4, "max_length": 48, "lr": 1e-2, "checkpoint_every": 2, "eval_limit": 4}
    return TrainConfig(base=str(base), task=task, method="mezo_lora", rank=4, **{**settings, **kw})


def test_mezo_lora_writes_an_expert_and_resumes_exactly(tiny_base, tmp_path, monkeypatch):
    task = write_task(tmp_path / "parity.jsonl", parity_rows(40))
    whole = train_expert(_cfg(tiny_base, task), tmp_path / "whole", progress=False)
    assert whole.method == "mezo_lora" and whole.kind == "adapter"
    assert whole.hyperparameters["optimizer"] == "mezo" and whole.hyperparameters["eps"] == 1e-3
    assert verify_expert_files(tmp_path / "whole") == []
    load_model(str(tiny_base), tmp_path / "whole", device="cpu")

    real, calls = zeroth.mezo_step, []

    def crash_after_three(*args, **kw):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(zeroth, "mezo_step", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        train_expert(_cfg(tiny_base, task), tmp_path / "resumed", progress=False)
    monkeypatch.setattr(zeroth, "mezo_step", real)
    resumed = train_expert(_cfg(tiny_base, task), tmp_path / "resumed", resume=True, progress=False)

    assert resumed.cost["resumed_from_step"] == 2
    assert resumed.cost["final_loss"] == whole.cost["final_loss"]
    a = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(k for k in a if "lora_B" in k)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # the zero-initialised B did move


def test_full_parameter_mezo_writes_a_full_model(tiny_base, tmp_path):
    task = write_task(tmp_path / "parity.jsonl", parity_rows(20))
    cfg = TrainConfig(base=str(tiny_base), task=task, method="mezo", steps=2, batch_size=4, max_length=48, eval_limit=2)
    meta = train_expert(cfg, tmp_path / "full", progress=False)
    assert meta.kind == "full" and read_expert_meta(tmp_path / "full").method == "mezo"
    base, _ = load_base(str(tiny_base), device="cpu")
    trained, _ = load_model(str(tiny_base), tmp_path / "full", device="cpu")
    moved = [
        n for (n, p), q in zip(base.named_parameters(), trained.parameters(), strict=True) if not torch.equal(p, q)
    ]
    assert moved  # every weight is in the perturbed set: they all move


def test_dpo_with_mezo_is_refused(tiny_base, tmp_path):
    from moerge.errors import MoergeError

    prefs = tmp_path / "p.jsonl"
    prefs.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    cfg = TrainConfig(base=str(tiny_base), type="dpo", preferences=str(prefs), method="mezo_lora", steps=1)
    with pytest.raises(MoergeError, match="zeroth-order"):
        train_expert(cfg, tmp_path / "x", progress=False)
