import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import addition_rows, parity_rows, write_task
from moerge.errors import MoergeError
from moerge.library.expert import read_expert_meta, verify_expert_files
from moerge.recipes.train import train_expert
from moerge.train import METHODS, TrainConfig
from moerge.train.checkpoint import checkpoint_dir_for
from moerge.train.data import batch_order


def _cfg(base, task, **kw) -> TrainConfig:
    defaults = {"steps": 6, "batch_size": 4, "max_length": 48, "lr": 5e-3, "checkpoint_every": 2, "eval_limit": 4}
    return TrainConfig(base=str(base), task=task, **{**defaults, **kw})


@pytest.fixture
def parity(tmp_path):
    return write_task(tmp_path / "parity.jsonl", parity_rows(60))


@pytest.mark.parametrize("method", ["lora", "dora", "rslora", "pissa", "ia3"])
def test_adapter_methods_write_peft_loadable_experts(tiny_base, parity, tmp_path, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    meta = train_expert(_cfg(tiny_base, parity, method=method), out, progress=False)
    assert meta.method == method and meta.kind == "adapter"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert verify_expert_files(out) == []
    assert 0 < meta.cost["trainable_params"] < 100_000
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(out))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or "ia3_" in n) > 0
    assert not checkpoint_dir_for(out).exists()


def test_pissa_expert_reproduces_trained_model_on_original_base(tiny_base, parity, tmp_path):
    """The converted PiSSA adapter must act on the *unmodified* base like the trained residual model."""
    from moerge.data import load_task
    from moerge.data.formats import MOERGE
    from moerge.eval.evaluate import evaluate_task
    from moerge.library.loading import load_model

    cfg = _cfg(tiny_base, parity, method="pissa", eval_limit=None)
    meta = train_expert(cfg, tmp_path / "p", progress=False)
    model, tok = load_model(tiny_base, tmp_path / "p")
    again = evaluate_task(model, tok, load_task(parity), fmt=MOERGE, split="test", progress=False)
    assert again["scores"] == meta.metrics["test"]["scores"]


def test_full_finetuning_trains_every_weight(tiny_base, parity, tmp_path):
    meta = train_expert(_cfg(tiny_base, parity, method="full", lr=1e-3), tmp_path / "full", progress=False)
    assert meta.kind == "full"
    total = sum(t.numel() for t in load_file(str(tmp_path / "full" / "model.safetensors")).values())
    assert meta.cost["trainable_params"] == total


def test_metadata_records_what_and_how(tiny_base, parity, tmp_path):
    train_expert(_cfg(tiny_base, parity, rank=4, alpha=8), tmp_path / "e", progress=False)
    raw = json.loads((tmp_path / "e" / "moerge.json").read_text())
    assert raw["task"]["name"] == "parity" and len(raw["task"]["data_hash"]) == 64
    assert raw["base"]["fingerprint"].startswith("sha256:")
    assert raw["hyperparameters"]["rank"] == 4 and raw["hyperparameters"]["alpha"] == 8
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(raw["files"])
    assert raw["cost"]["train_time_s"] > 0 and raw["cost"]["peak_memory_mb"] > 0
    assert raw["metrics"]["test"]["n"] == 4
    assert read_expert_meta(tmp_path / "e").moerge_version == raw["moerge_version"]


def test_loss_goes_down(tiny_base, tmp_path):
    task = write_task(tmp_path / "add.jsonl", addition_rows(64))
    meta = train_expert(_cfg(tiny_base, task, steps=30, lr=1e-2, eval_split=None), tmp_path / "e", progress=False)
    assert meta.cost["final_loss"] < _first_loss(tiny_base, task) - 0.3


def _first_loss(base, task) -> float:
    from moerge.data import load_task
    from moerge.data.formats import MOERGE
    from moerge.data.prompts import collate, encode_for_training
    from moerge.models import load_base

    model, tok = load_base(base)
    examples = load_task(task).train[:16]
    batch = collate([encode_for_training(tok, ex, 48, MOERGE) for ex in examples], tok.pad_token_id)
    with torch.no_grad():
        return float(model(**batch).loss)


def test_interrupted_run_resumes_to_the_same_expert(tiny_base, parity, tmp_path, monkeypatch):
    import moerge.train.loop as loop

    cfg = _cfg(tiny_base, parity, steps=8, checkpoint_every=3, eval_split=None)
    train_expert(cfg, tmp_path / "straight", progress=False)

    real = loop.lr_factor

    def crash_at_step_5(step, total, warmup):
        if step == 5:
            raise RuntimeError("simulated crash")
        return real(step, total, warmup)

    monkeypatch.setattr(loop, "lr_factor", crash_at_step_5)
    with pytest.raises(RuntimeError):
        train_expert(cfg, tmp_path / "resumed", progress=False)
    assert not (tmp_path / "resumed").exists()  # nothing half-written where the expert goes
    with pytest.raises(MoergeError, match="--resume"):
        train_expert(cfg, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(loop, "lr_factor", real)
    meta = train_expert(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert meta.cost["resumed_from_step"] == 3
    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_resume_with_other_settings_is_refused(tiny_base, parity, tmp_path, monkeypatch):
    import moerge.train.loop as loop

    monkeypatch.setattr(loop, "lr_factor", lambda step, total, warmup: 1 / 0 if step == 3 else 1.0)
    with pytest.raises(ZeroDivisionError):
        train_expert(_cfg(tiny_base, parity), tmp_path / "e", progress=False)
    with pytest.raises(MoergeError, match="different settings"):
        train_expert(_cfg(tiny_base, parity, rank=2), tmp_path / "e", resume=True, progress=False)


def test_existing_expert_is_not_clobbered(tiny_base, parity, tmp_path):
    (tmp_path / "e").mkdir()
    with pytest.raises(MoergeError, match="--overwrite"):
        train_expert(_cfg(tiny_base, parity), tmp_path / "e", progress=False)


def test_unknown_method_lists_known(tiny_base, parity, tmp_path):
    with pytest.raises(MoergeError, match="lora"):
        train_expert(_cfg(tiny_base, parity, method="magic"), tmp_path / "e", progress=False)


def test_batch_order_covers_each_epoch_once():
    seen = [i for step in range(5) for i in batch_order(20, 4, seed=3, step=step)]
    assert sorted(seen) == list(range(20))
    assert batch_order(20, 4, seed=3, step=2) == batch_order(20, 4, seed=3, step=2)
    assert batch_order(20, 4, seed=3, step=0) != batch_order(20, 4, seed=4, step=0)


def test_registry_has_the_stage_one_methods():
    assert {"lora", "dora", "rslora", "pissa", "ia3", "full"} <= set(METHODS)
