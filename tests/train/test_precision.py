"""Mixed precision, gradient checkpointing, gradient accumulation and the quantised-base refusal (tiny model, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_tiny_base, parity_rows, write_task
from moerge.errors import MoergeError
from moerge.library.expert import ExpertMeta, read_expert_meta
from moerge.recipes.train import train_expert
from moerge.train import TrainConfig
from moerge.train.checkpoint import checkpoint_dir_for
from moerge.train.loop import Start, load_start, prepare_for_training, total_steps_for


@pytest.fixture(scope="module")
def learnable_base(tmp_path_factory) -> Path:
    """A tiny base with larger initial weights, so a few LoRA steps move the loss (see make_tiny_base)."""
    return make_tiny_base(tmp_path_factory.mktemp("learnable"), init_std=0.2)


@pytest.fixture
def parity(tmp_path) -> str:
    return write_task(tmp_path / "parity.jsonl", parity_rows(64))


def _cfg(base, task, **kw) -> TrainConfig:
    fast = {"steps": 4, "batch_size": 8, "max_length": 48, "lr": 5e-3, "eval_limit": 2, "checkpoint_every": 100}
    return TrainConfig(base=str(base), task=task, **{**fast, **kw})


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


# ---- bf16 ----------------------------------------------------------------------------------------------


def test_bf16_holds_the_base_low_and_the_trainable_weights_in_fp32(tiny_base):
    cfg = _cfg(tiny_base, "t.jsonl", dtype="bf16")
    from moerge.train.methods import get_method
    from moerge.train.methods.base import InitData

    model, _ = load_start(Start(str(tiny_base)), "cpu", dtype="bf16")
    model = prepare_for_training(get_method("lora").prepare(model, cfg, Path(), InitData()), cfg)
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}


def test_bf16_training_tracks_fp32(learnable_base, parity, tmp_path, monkeypatch):
    """The same run (seed, data order) in bf16 and fp32: every step's loss agrees within 0.05 + 2%.

    Why that tolerance: bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2% per operation); on a
    2-layer model the logits go through ~10 rounded matmuls and norms, so the loss (≈ 0.3–6 nats) moves by
    a few 0.1%–1%; the LoRA weights themselves stay fp32, so the error does not compound over steps. A run
    that trained in the wrong dtype, or diverged, fails it; the loss must also have fallen by a fifth."""
    from moerge.train import loop

    curves: dict[str, list[float]] = {}
    real = loop.batch_loss

    def recording(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        if torch.is_grad_enabled():
            curves.setdefault(current, []).append(loss.item())
        return loss, parts

    monkeypatch.setattr(loop, "batch_loss", recording)
    metas = {}
    for current in ("fp32", "bf16"):
        metas[current] = train_expert(_cfg(learnable_base, parity, dtype=current, steps=12), tmp_path / current)
    assert metas["fp32"].dtype == "fp32" and metas["bf16"].dtype == "bf16"
    assert json.loads((tmp_path / "bf16" / "moerge.json").read_text())["dtype"] == "bf16"
    assert metas["bf16"].hyperparameters["dtype"] == "bf16" and metas["bf16"].quantize is None
    assert {t.dtype for t in _adapter(tmp_path / "bf16").values()} == {torch.float32}
    assert len(curves["fp32"]) == len(curves["bf16"]) == 12
    assert curves["fp32"][-1] < 0.8 * curves["fp32"][0]  # it learned something
    for a, b in zip(curves["fp32"], curves["bf16"], strict=True):
        assert abs(a - b) <= 0.05 + 0.02 * abs(a), (curves["fp32"], curves["bf16"])


def test_fp16_training_off_cuda_is_one_line(tiny_base, parity, tmp_path):
    with pytest.raises(MoergeError, match="fp16 training needs a CUDA device"):
        train_expert(_cfg(tiny_base, parity, dtype="fp16"), tmp_path / "e", progress=False)
    assert not (tmp_path / "e").exists() and not checkpoint_dir_for(tmp_path / "e").exists()


# ---- gradient checkpointing ---------------------------------------------------------------------------


def _lora_grads(base: Path, checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of one batch's loss w.r.t. a LoRA (B initialised non-zero so A gets gradients too), and
    how many times layer 0's MLP ran forward (2 with checkpointing: the recompute)."""
    from moerge.train.loop import batch_loss
    from moerge.train.methods import get_method
    from moerge.train.methods.base import InitData

    cfg = _cfg(base, "t.jsonl", gradient_checkpointing=checkpointing)
    model, _ = load_start(Start(str(base)), "cpu", dtype="fp32")
    torch.manual_seed(0)
    model = get_method("lora").prepare(model, cfg, Path(), InitData())
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    model = prepare_for_training(model, cfg)
    calls = []
    mlp = model.get_base_model().model.layers[0].mlp
    real_forward = mlp.forward  # (module hooks do not fire in the recompute; the forward itself runs)

    def counting(*args, **kwargs):
        calls.append(1)
        return real_forward(*args, **kwargs)

    mlp.forward = counting
    ids = torch.randint(3, 200, (4, 24), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :12] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    model.train()
    loss, _ = batch_loss(model, batch, [0] * 4, per_task=False)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(calls)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_base):
    plain, plain_calls = _lora_grads(tiny_base, checkpointing=False)
    checkpointed, recomputed_calls = _lora_grads(tiny_base, checkpointing=True)
    assert plain_calls == 1 and recomputed_calls == 2  # checkpointing really recomputed the layer
    assert plain.keys() == checkpointed.keys() and any(g.abs().sum() > 0 for g in plain.values())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointing_does_not_change_the_fingerprint_but_dtype_and_accumulation_do():
    base = TrainConfig(base="b", task="t")
    assert (
        TrainConfig(base="b", task="t", dtype="auto", grad_accum=1, quantize=None).fingerprint() == base.fingerprint()
    )
    assert TrainConfig(base="b", task="t", gradient_checkpointing=True).fingerprint() == base.fingerprint()
    changed = [
        TrainConfig(base="b", task="t", dtype="bf16"),
        TrainConfig(base="b", task="t", dtype="fp32"),
        TrainConfig(base="b", task="t", grad_accum=4),
        TrainConfig(base="b", task="t", quantize="4bit"),
    ]
    assert len({c.fingerprint() for c in changed} | {base.fingerprint()}) == 5


# ---- gradient accumulation ----------------------------------------------------------------------------


@pytest.mark.parametrize("per_task_loss", [False, True])
def test_grad_accum_4_of_batch_2_equals_batch_8(learnable_base, tmp_path, per_task_loss):
    """Same data order, same optimizer steps: the final adapters agree (to float rounding; the micro-batches
    are padded to their own longest row, so the sums run over differently shaped matmuls). Parity answers
    have 2 or 3 tokens, so micro-batches hold different token counts: normalising each micro-batch by its
    own count (instead of the step's) would fail this."""
    tasks = {
        "tasks": [
            write_task(tmp_path / "parity.jsonl", parity_rows(40)),
            write_task(tmp_path / "words.jsonl", [{"input": f"Say {w}", "target": w} for w in ["a", "bb", "ccc"] * 8]),
        ]
    }
    big = train_expert(
        _cfg(learnable_base, None, **tasks, per_task_loss=per_task_loss, steps=3), tmp_path / "big", progress=False
    )
    small = _cfg(learnable_base, None, **tasks, per_task_loss=per_task_loss, steps=3, batch_size=2, grad_accum=4)
    accumulated = train_expert(small, tmp_path / "acc", progress=False)
    a, b = _adapter(tmp_path / "big"), _adapter(tmp_path / "acc")
    assert max(float(t.abs().max()) for t in a.values()) > 1e-3  # the adapters moved
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=2e-5, msg=name)
    assert accumulated.cost["train_tokens"] == big.cost["train_tokens"]
    assert accumulated.hyperparameters["effective_batch_size"] == 8 and accumulated.hyperparameters["steps"] == 3
    assert accumulated.cost["final_loss"] == pytest.approx(big.cost["final_loss"], abs=1e-3)


def test_epochs_count_effective_batches():
    cfg = TrainConfig(base="b", task="t", batch_size=2, grad_accum=4, epochs=2)
    assert total_steps_for(cfg, 40) == 10  # 2 × 40 examples / 8 per optimizer step


def test_accumulated_run_resumes_at_an_optimizer_step(learnable_base, parity, tmp_path, monkeypatch):
    """A run killed after its step-2 checkpoint resumes there and ends with the uninterrupted run's weights."""
    from moerge.train import loop

    cfg = _cfg(learnable_base, parity, steps=4, batch_size=2, grad_accum=3, checkpoint_every=2)
    train_expert(cfg, tmp_path / "whole", progress=False)
    real = loop.lr_factor

    def crash_at_step_3(step, total, warmup):
        if step == 3:
            raise KeyboardInterrupt
        return real(step, total, warmup)

    monkeypatch.setattr(loop, "lr_factor", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_expert(cfg, tmp_path / "cut", progress=False)
    state = json.loads((checkpoint_dir_for(tmp_path / "cut") / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2
    monkeypatch.setattr(loop, "lr_factor", real)
    meta = train_expert(cfg, tmp_path / "cut", resume=True, progress=False)
    assert meta.cost["resumed_from_step"] == 2
    whole, cut = _adapter(tmp_path / "whole"), _adapter(tmp_path / "cut")
    for name in whole:
        torch.testing.assert_close(cut[name], whole[name], rtol=0, atol=1e-6, msg=name)


# ---- quantised base -----------------------------------------------------------------------------------


def test_quantize_without_cuda_or_bitsandbytes_is_one_line_exit_2(tiny_base, parity, tmp_path):
    out = tmp_path / "q"
    args = ["train", "--base", str(tiny_base), "--task", parity, "--quantize", "4bit", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-c", "from moerge.cli.main import run; run()", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: --quantize 4bit:") and "pip install moerge[quantize]" in lines[0]
    assert not out.exists() and not checkpoint_dir_for(out).exists()


def test_quantize_refuses_methods_that_change_the_base():
    with pytest.raises(Exception, match="quantize: 4bit needs a method that leaves the base untouched; 'full'"):
        TrainConfig(base="b", task="t", method="full", quantize="4bit")
    with pytest.raises(Exception, match="'pissa' rewrites the base's weights"):
        TrainConfig(base="b", task="t", method="pissa", quantize="8bit")
    assert TrainConfig(base="b", task="t", method="dora", quantize="4bit").quantize == "4bit"


def test_expert_meta_without_the_new_fields_still_loads(tiny_base, parity, tmp_path):
    train_expert(_cfg(tiny_base, parity, eval_split=None), tmp_path / "e", progress=False)
    raw = json.loads((tmp_path / "e" / "moerge.json").read_text())
    assert raw["dtype"] == "fp32" and raw["quantize"] is None  # auto on a CPU
    old = {k: v for k, v in raw.items() if k not in ("dtype", "quantize")}
    meta = ExpertMeta.model_validate(old)
    assert meta.dtype is None and meta.quantize is None
    assert read_expert_meta(tmp_path / "e").dtype == "fp32"


# ---- loading for inference ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_loads_keep_the_base_fingerprint(tiny_base, dtype):
    """An expert's recorded base fingerprint must match the base however it is loaded: bf16 sampling is
    exact for bf16 values; fp16 values are not (below fp16's normal range), so they fingerprint the folder."""
    from moerge.models.loading import fingerprint, load_base

    model, _ = load_base(tiny_base, dtype=dtype)
    assert next(model.parameters()).dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert fingerprint(model) == fingerprint(tiny_base)


def test_eval_runs_in_bf16_from_the_command_line(tiny_base, parity, monkeypatch):
    from typer.testing import CliRunner

    from moerge.cli.main import app
    from moerge.models import loading

    monkeypatch.setattr(loading, "_DEFAULTS", loading.LoadDefaults())  # the command sets process-wide defaults
    args = ["eval", "--base", str(tiny_base), "--task", parity, "--limit", "2", "--json", "--dtype", "bf16"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["n"] == 2
    assert loading.load_defaults() == loading.LoadDefaults(dtype="bf16", device="cpu")
    model, _ = loading.load_base(tiny_base)  # what every load of the command got: the defaults it set
    assert next(model.parameters()).dtype == torch.bfloat16
    bad = CliRunner().invoke(app, [*args, "--device-map", "everywhere"])
    assert isinstance(bad.exception, MoergeError) and "--device-map: 'everywhere'" in str(bad.exception)
