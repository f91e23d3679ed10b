"""DPO stages: the loss and its gradient against the paper's formula computed directly, the frozen
reference (the stage's starting model), the preference file's errors, and an SFT → DPO recipe."""

import json

import pytest
import torch

from helpers import parity_rows, write_jsonl, write_task
from moerge.data.prompts import IGNORE_INDEX, collate
from moerge.errors import MoergeError
from moerge.library.expert import read_expert_meta, verify_expert_files
from moerge.library.loading import load_model
from moerge.recipes.train import train_expert
from moerge.train import TrainConfig, preference
from moerge.train.config import staged_from_dict
from moerge.train.data import batch_order
from moerge.train.preference import Pair, dpo_batch_loss, encode_pairs, read_preferences


def _pairs(n: int = 12) -> list[dict]:
    return [
        {"prompt": f"Is {i} even?", "chosen": "yes" if i % 2 == 0 else "no", "rejected": "no" if i % 2 == 0 else "yes"}
        for i in range(n)
    ]


def direct_logps(model, items) -> torch.Tensor:
    """Σ over answer tokens of log softmax(full logits)[next token], row by row, without padding tricks."""
    out = []
    for item in items:
        ids = torch.tensor([item.input_ids])
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        total = 0.0
        for t in range(1, len(item.input_ids)):
            if item.labels[t] != IGNORE_INDEX:
                total = total + logprobs[t - 1, item.labels[t]]
        out.append(total)
    return torch.stack(out)


def direct_dpo(pc, pr, rc, rr, beta, kind, smoothing):
    """The DPO (cDPO-smoothed) and IPO losses, written out term by term, averaged over pairs."""
    losses = []
    for i in range(len(pc)):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        if kind == "ipo":
            losses.append((h - 1 / (2 * beta)) ** 2)
        else:
            sig = lambda x: 1 / (1 + torch.exp(-x))  # noqa: E731
            losses.append(-(1 - smoothing) * torch.log(sig(beta * h)) - smoothing * torch.log(sig(-beta * h)))
    return torch.stack(losses).mean()


@pytest.fixture
def lora_model(tiny_base):
    """The tiny base with a LoRA whose B is non-zero, so the adapter changes the log-probs."""
    from peft import LoraConfig, get_peft_model

    from moerge.models import load_base

    model, tokenizer = load_base(str(tiny_base), device="cpu")
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, tokenizer


@pytest.mark.parametrize(
    ("kind", "smoothing", "beta"), [("sigmoid", 0.0, 0.1), ("sigmoid", 0.2, 0.5), ("ipo", 0.0, 0.3)]
)
def test_dpo_loss_and_gradient_equal_the_formula(lora_model, tiny_base, kind, smoothing, beta):
    model, tokenizer = lora_model
    model.eval()
    cfg = TrainConfig(
        base=str(tiny_base), type="dpo", preferences="p.jsonl", beta=beta, loss=kind, label_smoothing=smoothing
    )
    pairs = [Pair("Is 4 even?", "yes", "no"), Pair("2+3=", "5", "six"), Pair("Colour of sky?", "blue", "green")]
    chosen, rejected = encode_pairs(pairs, tokenizer, cfg)
    ref = torch.tensor([[-3.0, -4.5], [-2.0, -1.0], [-7.5, -7.0]])  # a hand-made reference
    params = [p for p in model.parameters() if p.requires_grad]

    ours, _ = dpo_batch_loss(model, chosen, rejected, ref, cfg, tokenizer.pad_token_id, "cpu")
    ours_grads = torch.autograd.grad(ours, params)
    expected = direct_dpo(
        direct_logps(model, chosen), direct_logps(model, rejected), ref[:, 0], ref[:, 1], beta, kind, smoothing
    )
    expected_grads = torch.autograd.grad(expected, params)

    assert ours.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert any(g.abs().sum() > 0 for g in expected_grads)
    for a, b in zip(ours_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_log_probs_sum_the_answer_tokens_only(lora_model, tiny_base):
    """Padding and prompt tokens add nothing: a batch of mixed lengths gives each row's own sum."""
    model, tokenizer = lora_model
    cfg = TrainConfig(base=str(tiny_base), type="dpo", preferences="p.jsonl")
    chosen, rejected = encode_pairs([Pair("a long prompt here", "x", "a much longer answer")], tokenizer, cfg)
    with torch.no_grad():
        ours = preference.sequence_logps(model, collate([*chosen, *rejected], tokenizer.pad_token_id))
        torch.testing.assert_close(ours, direct_logps(model, [*chosen, *rejected]), rtol=1e-5, atol=1e-5)
    answer = [t for t in rejected[0].labels if t != IGNORE_INDEX]
    assert 0 < len(answer) < len(rejected[0].input_ids)


def test_preference_files_errors_name_file_line_and_field(tmp_path):
    good = write_jsonl(tmp_path / "p.jsonl", _pairs(3))
    assert read_preferences(str(good))[1] == Pair("Is 1 even?", "no", "yes")
    csv = tmp_path / "p.csv"
    csv.write_text('prompt,chosen,rejected\n"1+1=",2,3\n')
    assert read_preferences(str(csv)) == [Pair("1+1=", "2", "3")]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_pairs(1)[0]) + "\n" + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(MoergeError, match=r"bad\.jsonl:2: field 'rejected' is missing"):
        read_preferences(str(bad))
    bad.write_text(json.dumps({"prompt": "q", "chosen": 3, "rejected": "a"}) + "\n")
    with pytest.raises(MoergeError, match=r"bad\.jsonl:1: field 'chosen' must be a string"):
        read_preferences(str(bad))
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("prompt,chosen,rejected\nq,a,b\nq,,b\n")
    with pytest.raises(MoergeError, match=r"bad\.csv:3: field 'chosen' is missing"):
        read_preferences(str(bad_csv))
    with pytest.raises(MoergeError, match=r"must be \.jsonl or \.csv"):
        read_preferences(str(write_task(tmp_path / "p.txt", [])))


def test_a_dpo_stage_needs_preferences(tiny_base):
    with pytest.raises(ValueError, match="needs `preferences`"):
        TrainConfig(base=str(tiny_base), type="dpo")


def test_sft_then_dpo_recipe_against_a_frozen_sft_reference(tmp_path, tiny_base, monkeypatch):
    """The reference of the DPO stage is the SFT expert (not the base), computed once and the same at every
    step while the policy moves; the recipe writes an expert folder that loads."""
    task = write_task(tmp_path / "parity.jsonl", parity_rows(40))
    prefs = write_jsonl(tmp_path / "prefs.jsonl", _pairs(12))
    common = {"batch_size": 4, "max_length": 48, "eval_limit": 4, "lr": 5e-3}
    sft = {"name": "sft", "steps": 4, **common}
    recipe = staged_from_dict(
        {
            "base": str(tiny_base),
            "task": task,
            "method": "lora",
            "stages": [
                sft,
                {"name": "dpo", "type": "dpo", "preferences": str(prefs), "steps": 4, "beta": 0.5, **common},
            ],
        }
    )
    seen = []
    real = preference.dpo_batch_loss

    def recording(model, chosen, rejected, ref, cfg, pad_id, device):
        loss, tokens = real(model, chosen, rejected, ref, cfg, pad_id, device)
        with torch.no_grad():
            now = preference.pair_logps(model, chosen, rejected, pad_id, device)
        seen.append((ref.clone(), torch.stack(now[:2], dim=1)))
        return loss, tokens

    monkeypatch.setattr(preference, "dpo_batch_loss", recording)
    meta = train_expert(recipe, tmp_path / "expert", progress=False)

    # The SFT stage alone, trained the same way, is the reference the DPO stage must have used.
    train_expert(TrainConfig(base=str(tiny_base), task=task, method="lora", **sft), tmp_path / "sft", progress=False)
    sft_model, tokenizer = load_model(str(tiny_base), tmp_path / "sft", device="cpu")
    base_model, _ = load_model(str(tiny_base), device="cpu")
    cfg = recipe.stages[1]
    chosen, rejected = encode_pairs(read_preferences(str(prefs)), tokenizer, cfg)
    with torch.no_grad():
        expected = torch.stack([direct_logps(sft_model.eval(), chosen), direct_logps(sft_model, rejected)], dim=1)
        of_base = torch.stack([direct_logps(base_model.eval(), chosen), direct_logps(base_model, rejected)], dim=1)
    assert len(seen) == 4
    for step, (ref, _) in enumerate(seen):  # every step's reference: the SFT expert's log-probs of its pairs
        torch.testing.assert_close(ref, expected[batch_order(12, 4, cfg.seed, step)], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expected, of_base, atol=1e-3)  # so the reference is not the base's
    assert (seen[-1][1] - seen[-1][0]).abs().max() > 1e-3  # and the policy did move away from it

    out = tmp_path / "expert"
    assert verify_expert_files(out) == []
    stored = read_expert_meta(out)
    assert stored.kind == "adapter" and [s["type"] for s in stored.stages] == ["finetune", "dpo"]
    dpo = stored.stages[1]
    assert dpo["hyperparameters"]["beta"] == 0.5 and dpo["hyperparameters"]["pairs"] == 12
    assert 0 <= dpo["metrics"]["preference"]["reward_accuracy"] <= 1
    assert meta.metrics["test"]["n"] == 4
    model, _ = load_model(str(tiny_base), out, device="cpu")
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


def test_cli_objective_dpo_trains_a_lora_on_preferences(tmp_path, tiny_base):
    from typer.testing import CliRunner

    from moerge.cli.main import app

    prefs = write_jsonl(tmp_path / "prefs.jsonl", _pairs(6))
    out = tmp_path / "dpo"
    args = ["train", "--base", str(tiny_base), "--objective", "dpo", "--preferences", str(prefs), "--method", "lora"]
    args += ["--steps", "2", "--batch-size", "3", "--beta", "0.2", "--option", "loss=ipo", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    stage = read_expert_meta(out).stages[0]
    assert stage["type"] == "dpo" and stage["hyperparameters"]["loss"] == "ipo"
    assert stage["hyperparameters"]["beta"] == 0.2 and stage["task"]["name"] == "prefs"


def test_a_resumed_dpo_stage_keeps_the_reference_of_its_start(tmp_path, tiny_base, monkeypatch):
    """On resume the model has moved: the reference comes from the work folder, not from a new pass,
    so the interrupted and the uninterrupted runs end with the same weights."""
    from safetensors.torch import load_file

    prefs = write_jsonl(tmp_path / "prefs.jsonl", _pairs(12))
    cfg = TrainConfig(
        base=str(tiny_base),
        type="dpo",
        preferences=str(prefs),
        method="lora",
        steps=5,
        batch_size=4,
        lr=5e-3,
        checkpoint_every=2,
        max_length=48,
    )
    train_expert(cfg, tmp_path / "whole", progress=False)

    real, calls = preference.dpo_batch_loss, []

    def crash_after_three(*args, **kw):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(preference, "dpo_batch_loss", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        train_expert(cfg, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(preference, "dpo_batch_loss", real)
    passes = []
    real_ref = preference.reference_logps
    monkeypatch.setattr(preference, "reference_logps", lambda *a: passes.append(1) or real_ref(*a))
    meta = train_expert(cfg, tmp_path / "resumed", resume=True, progress=False)

    assert meta.stages[0]["cost"]["resumed_from_step"] == 2
    assert len(passes) == 1  # only the final scoring pass: the reference was read back
    a = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["full", "hft"])
def test_dpo_with_full_weight_methods_writes_a_full_expert(tmp_path, tiny_base, method):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", _pairs(6))
    cfg = TrainConfig(
        base=str(tiny_base), type="dpo", preferences=str(prefs), method=method, steps=2, batch_size=3, lr=1e-3
    )
    meta = train_expert(cfg, tmp_path / "e", progress=False)
    assert meta.kind == "full" and meta.method == method
    base, _ = load_model(str(tiny_base), device="cpu")
    trained, _ = load_model(str(tiny_base), tmp_path / "e", device="cpu")
    assert any(not torch.equal(p, q) for p, q in zip(base.parameters(), trained.parameters(), strict=True))
