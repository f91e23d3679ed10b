"""Trained mixtures of LoRA experts (`mixlora`, `hydralora`): K=1 is LoRA, balance loss, save/reload, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from helpers import addition_rows, parity_rows, write_task
from moerge.cli.main import app
from moerge.errors import MoergeError
from moerge.library.expert import BaseInfo, ExpertMeta, TaskInfo, verify_expert_files, write_expert_meta
from moerge.models.mixture import (
    MIXTURE_WEIGHTS,
    LoraMixtureLinear,
    MixtureSpec,
    RoutingContext,
    as_peft_lora,
    export_peft_lora,
    inject_mixture,
    load_entropy,
    read_mixture_spec,
    save_mixture,
)
from moerge.recipes.train import train_expert
from moerge.train import TrainConfig
from moerge.train import loop as train_loop

FAST = {"batch_size": 4, "max_length": 48, "lr": 5e-3, "rank": 4, "eval_limit": 4, "checkpoint_every": 100}


@pytest.fixture
def parity(tmp_path):
    return write_task(tmp_path / "parity.jsonl", parity_rows(40))


def _cfg(base, task, **kw) -> TrainConfig:
    return TrainConfig(base=str(base), task=task, **{**FAST, "steps": 5, **kw})


def _upcycle_cfg(base, task, **kw) -> TrainConfig:
    """Upcycling takes rank and alpha from the experts it copies."""
    fast = {k: v for k, v in FAST.items() if k != "rank"}
    return TrainConfig(base=str(base), task=task, method="upcycle", **{**fast, "steps": 5, **kw})


def _train_recording_losses(cfg: TrainConfig, out, monkeypatch) -> list[float]:
    """Train, returning every micro-batch's loss as the loop computed it (the loss curve, unrounded)."""
    losses: list[float] = []
    real = train_loop.batch_loss

    def recording(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        if torch.is_grad_enabled():
            losses.append(float(loss.detach()))
        return loss, parts

    monkeypatch.setattr(train_loop, "batch_loss", recording)
    train_expert(cfg, out, progress=False)
    monkeypatch.setattr(train_loop, "batch_loss", real)
    return losses


def test_one_expert_mixlora_trains_exactly_like_lora(tiny_base, parity, tmp_path, monkeypatch):
    common = {"dropout": 0.1, "steps": 6}
    lora_losses = _train_recording_losses(_cfg(tiny_base, parity, method="lora", **common), tmp_path / "l", monkeypatch)
    mix_cfg = _cfg(tiny_base, parity, method="mixlora", num_experts=1, top_k=1, aux_loss_weight=0.5, **common)
    mix_losses = _train_recording_losses(mix_cfg, tmp_path / "m", monkeypatch)
    assert len(lora_losses) == 6 and lora_losses[0] != lora_losses[-1]
    assert mix_losses == pytest.approx(lora_losses, rel=1e-6, abs=1e-7)

    lora = load_file(str(tmp_path / "l" / "adapter_model.safetensors"))
    spec = read_mixture_spec(tmp_path / "m")
    config, as_lora = as_peft_lora(spec, load_file(str(tmp_path / "m" / MIXTURE_WEIGHTS)))
    assert sorted(as_lora) == sorted(lora) and config["r"] == 4
    assert any(t.abs().sum() > 0 for k, t in lora.items() if "lora_B" in k)  # trained, not just the init
    for key, value in lora.items():
        torch.testing.assert_close(as_lora[key], value, rtol=1e-5, atol=1e-6)
    meta = json.loads((tmp_path / "m" / "moerge.json").read_text())
    assert meta["kind"] == "mixture" and meta["hyperparameters"]["router_load"]["load_mean"] == [1.0]
    # the one-expert mixture written as a plain peft LoRA folder acts as the mixture does
    from moerge.library.loading import load_model

    export_peft_lora(tmp_path / "m", tmp_path / "as_lora")
    ids = torch.tensor([[5, 9, 12, 7, 3, 4]])
    as_peft, _ = load_model(tiny_base, tmp_path / "as_lora")
    mixture, _ = load_model(tiny_base, tmp_path / "m")
    torch.testing.assert_close(as_peft(input_ids=ids).logits, mixture(input_ids=ids).logits, rtol=0, atol=1e-6)


def _routed_layer(experts: int, top_k: int, *, seed: int = 0) -> LoraMixtureLinear:
    torch.manual_seed(seed)
    layer = LoraMixtureLinear(
        nn.Linear(16, 16),
        experts=experts,
        top_k=top_k,
        rank=4,
        scaling=1.0,
        dropout=0.0,
        shared_a=False,
        routed=True,
        context=RoutingContext(),
    )
    for param in layer.base_layer.parameters():
        param.requires_grad_(False)
    return layer


def test_balance_loss_is_switch_loss_over_real_tokens():
    layer = _routed_layer(4, 2)
    nn.init.normal_(layer.router)
    x = torch.randn(3, 5, 16)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, :2] = 0
    layer.context.mask = mask
    layer.route(x)
    probs = (x @ layer.router.T).softmax(-1)[mask.bool()]
    top = probs.topk(2, dim=-1).indices
    share = torch.stack([(top == i).any(dim=-1).float().mean() / 2 for i in range(4)])
    expected = 4 * (share * probs.mean(dim=0)).sum() - 1
    torch.testing.assert_close(layer.aux, expected)


def _router_load_entropy(aux_weight: float) -> float:
    """Train only the router of a 4-expert top-2 layer, which starts sending every token to expert 0,
    towards expert 0's output (a task that rewards that imbalance), with the balance loss at
    `aux_weight`; return the final load's relative entropy."""
    layer = _routed_layer(4, 2, seed=1)
    for b in layer.lora_B:
        nn.init.normal_(b.weight)
    for param in [*layer.lora_A.parameters(), *layer.lora_B.parameters()]:
        param.requires_grad_(False)
    with torch.no_grad():
        layer.router[0] = 0.3  # starts favouring expert 0 on these (positive-mean) inputs
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(256, 16, generator=generator) + 1.0
    with torch.no_grad():
        target = layer.base_layer(x) + layer.lora_B[0](layer.lora_A[0](x))
    optimizer = torch.optim.Adam([layer.router], lr=0.05)
    for _ in range(150):
        loss = (layer(x) - target).pow(2).mean() + aux_weight * layer.aux
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    layer.counting, layer.load_sum, layer.tokens = True, torch.zeros(4), 0
    with torch.no_grad():
        layer(x)
    return load_entropy(layer.load_sum)


def test_balance_loss_pushes_the_load_towards_uniform():
    without, with_aux = _router_load_entropy(0.0), _router_load_entropy(10.0)
    assert with_aux > without + 0.05, (without, with_aux)
    assert with_aux > 0.9 and without < 0.8


def _meta(base) -> ExpertMeta:
    return ExpertMeta(
        name="m", kind="mixture", method="hydralora", task=TaskInfo(name="t"), base=BaseInfo(name_or_path=str(base))
    )


def test_mixture_saves_reloads_and_gives_identical_logits(tiny_base, tmp_path):
    from transformers import AutoModelForCausalLM

    from moerge.library.loading import load_model
    from moerge.models import fingerprint

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    ids = torch.tensor([[5, 9, 12, 7, 3, 4]])
    before, base_fingerprint = model(input_ids=ids).logits, fingerprint(model)
    modules = {n: "routed" for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))}
    spec = MixtureSpec(variant="hydralora", num_experts=3, top_k=2, rank=4, alpha=8.0, modules=modules)
    inject_mixture(model, spec, seed=3, router_std=1.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    model.eval()
    logits = model(input_ids=ids).logits
    assert not torch.allclose(logits, before)
    folder = tmp_path / "mix"
    save_mixture(model, spec, folder)
    meta = _meta(tiny_base).model_copy(
        update={"base": BaseInfo(name_or_path=str(tiny_base), fingerprint=base_fingerprint)}
    )
    write_expert_meta(folder, meta)
    assert verify_expert_files(folder) == []
    loaded, _ = load_model(tiny_base, folder)
    assert torch.equal(loaded(input_ids=ids).logits, logits)
    # a damaged weights file is refused, never loaded
    tensors = load_file(str(folder / MIXTURE_WEIGHTS))
    key = next(iter(tensors))
    tensors[key][0] = float("nan")
    from safetensors.torch import save_file

    save_file(tensors, str(folder / MIXTURE_WEIGHTS))
    with pytest.raises(MoergeError, match="sha256 mismatch"):
        load_model(tiny_base, folder)


def test_trained_mixlora_reloads_with_the_scores_it_was_trained_to(tiny_base, parity, tmp_path):
    from moerge.data import load_task
    from moerge.data.formats import MOERGE
    from moerge.eval.evaluate import evaluate_task
    from moerge.library.loading import load_model

    cfg = _cfg(tiny_base, parity, method="mixlora", num_experts=3, top_k=2, eval_limit=None)
    meta = train_expert(cfg, tmp_path / "mix", progress=False)
    hp = meta.hyperparameters
    assert (hp["num_experts"], hp["top_k"], hp["aux_loss_weight"]) == (3, 2, 0.01)
    load = hp["router_load"]
    assert len(load["load_per_layer"]) == 2 * 3  # two layers × gate/up/down
    assert all(sum(v) == pytest.approx(1.0, abs=1e-3) for v in load["load_per_layer"].values())
    assert 0 < load["load_entropy"] <= 1
    model, tok = load_model(tiny_base, tmp_path / "mix")
    again = evaluate_task(model, tok, load_task(parity), fmt=MOERGE, split="test", progress=False)
    assert again["scores"] == meta.metrics["test"]["scores"]


def test_hydralora_trains_one_shared_a_per_module_on_a_task_mixture(tiny_base, parity, tmp_path):
    addition = write_task(tmp_path / "addition.jsonl", addition_rows(40))
    cfg = TrainConfig(
        base=str(tiny_base),
        tasks=[parity, addition],
        method="hydralora",
        num_experts=3,
        target_modules="v_proj",
        **{**FAST, "steps": 4},
    )
    meta = train_expert(cfg, tmp_path / "h", progress=False)
    assert set(meta.metrics["train_loss_by_task"]) == {"parity", "addition"}
    tensors = load_file(str(tmp_path / "h" / MIXTURE_WEIGHTS))
    layer = "model.layers.0.self_attn.v_proj"
    assert sorted(k.removeprefix(layer + ".") for k in tensors if k.startswith(layer)) == [
        "lora_A.0.weight",
        "lora_B.0.weight",
        "lora_B.1.weight",
        "lora_B.2.weight",
        "router",
    ]
    heads = [tensors[f"{layer}.lora_B.{k}.weight"] for k in range(3)]
    assert not torch.equal(heads[0], heads[1])  # the router gives each head its own share of the gradient


def test_top_k_above_experts_is_refused(tiny_base, parity):
    with pytest.raises(Exception, match="top_k: 3 exceeds num_experts"):
        _cfg(tiny_base, parity, method="mixlora", num_experts=2, top_k=3)


def test_cli_trains_a_mixlora_expert_and_evaluates_it(tiny_base, parity, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli_mix"
    args = ["train", "--base", str(tiny_base), "--task", parity, "--method", "mixlora", "--out", str(out)]
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**FAST, "steps": 2}.items() if k != "checkpoint_every"]
    result = runner.invoke(app, [*args, *flags, "--option", "num_experts=2", "--option", "top_k=1"])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "moerge.json").read_text())
    assert meta["kind"] == "mixture" and meta["hyperparameters"]["num_experts"] == 2
    assert len(meta["hyperparameters"]["router_load"]["load_mean"]) == 2
    result = runner.invoke(
        app, ["eval", "--base", str(tiny_base), "--task", parity, "--adapter", str(out), "--limit", "3", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert math.isfinite(float(json.loads(result.output[result.output.index("{") :])["n"]))


def test_upcycled_copies_of_one_lora_start_as_that_lora_and_train(tiny_base, parity, tmp_path):
    from transformers import AutoModelForCausalLM

    from moerge.library.loading import load_model
    from moerge.train.methods import get_method
    from moerge.train.methods.base import InitData

    lora = tmp_path / "lora"
    train_expert(_cfg(tiny_base, parity, method="lora", steps=3), lora, progress=False)
    ids = torch.tensor([[5, 9, 12, 7, 3, 4], [6, 8, 10, 11, 2, 3]])
    peft_model, _ = load_model(tiny_base, lora)
    expected = peft_model(input_ids=ids).logits
    base_logits = AutoModelForCausalLM.from_pretrained(tiny_base)(input_ids=ids).logits
    assert not torch.allclose(expected, base_logits, atol=1e-4)  # the LoRA does something
    for top_k in (None, 1):
        cfg = _upcycle_cfg(tiny_base, parity, experts=f"{lora},{lora}", top_k=top_k)
        method = get_method("upcycle")
        model = method.prepare(AutoModelForCausalLM.from_pretrained(tiny_base), cfg, tmp_path, InitData())
        assert torch.equal(model.eval()(input_ids=ids).logits, expected)  # 0.5·y + 0.5·y == y in floats

    meta = train_expert(_upcycle_cfg(tiny_base, parity, experts=f"{lora},{lora}", top_k=1), tmp_path / "u")
    assert meta.kind == "mixture" and meta.hyperparameters["num_experts"] == 2
    trained = load_file(str(tmp_path / "u" / MIXTURE_WEIGHTS))
    start = load_file(str(lora / "adapter_model.safetensors"))
    key = "model.layers.0.mlp.down_proj.lora_B.0.weight"
    assert not torch.equal(trained[key], start[f"base_model.model.{key.replace('.0.weight', '.weight')}"])


def test_upcycle_refuses_loras_of_different_ranks(tiny_base, parity, tmp_path):
    for rank in (2, 4):
        train_expert(_cfg(tiny_base, parity, method="lora", steps=1, rank=rank), tmp_path / f"r{rank}", progress=False)
    cfg = _upcycle_cfg(tiny_base, parity, experts=f"{tmp_path / 'r2'},{tmp_path / 'r4'}")
    with pytest.raises(MoergeError, match="one rank and alpha"):
        train_expert(cfg, tmp_path / "u", progress=False)


def test_mixlora_trains_on_a_bf16_base(tiny_base, parity, tmp_path):
    """Plain-LoRA and routed layers hand the base's dtype on (a bf16 base with fp32 adapters)."""
    cfg = _cfg(tiny_base, parity, method="mixlora", dtype="bf16", steps=2, target_modules="v_proj,down_proj")
    meta = train_expert(cfg, tmp_path / "bf16", progress=False)
    assert meta.dtype == "bf16" and math.isfinite(meta.cost["final_loss"])
    assert sum(meta.hyperparameters["router_load"]["load_mean"]) == pytest.approx(1.0, abs=1e-3)
