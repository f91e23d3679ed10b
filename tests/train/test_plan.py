"""`moerge plan` / `train --dry-run`: counts from the config alone, and the peak estimate against measured RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import make_tokenizer, parity_rows, write_task
from moerge.cli.main import app
from moerge.train import TrainConfig
from moerge.train.plan import plan_training

runner = CliRunner()
SHAPE = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "vocab_size": 2048}


@pytest.fixture(scope="module")
def mid_base(tmp_path_factory) -> Path:
    """A Llama big enough that activations, not the allocator's noise, dominate a step's memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("mid_base")
    torch.manual_seed(0)
    config = LlamaConfig(
        **SHAPE, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def _actual(base: Path, cfg: TrainConfig) -> tuple[int, int]:
    """(trainable params, bytes of the frozen weights) of the model training really builds."""
    from moerge.train.loop import Start, load_start, prepare_for_training
    from moerge.train.methods import get_method
    from moerge.train.methods.base import InitData

    model, _ = load_start(Start(str(base)), "cpu", dtype=cfg.dtype)
    model = prepare_for_training(get_method(cfg.method).prepare(model, cfg, Path(), InitData()), cfg)
    params = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in params if not p.requires_grad)
    return trainable, frozen


@pytest.mark.parametrize(
    ("method", "dtype"), [("lora", "fp32"), ("lora", "bf16"), ("dora", "fp32"), ("full", "fp32"), ("hft", "bf16")]
)
def test_counts_match_the_model_training_builds(mid_base, method, dtype):
    cfg = TrainConfig(base=str(mid_base), task="t", method=method, dtype=dtype)
    plan = plan_training(cfg, device="cpu")
    trainable, frozen_bytes = _actual(mid_base, cfg)
    assert plan.trainable_params == trainable
    if method in ("lora", "dora"):
        assert plan.weights_bytes == frozen_bytes
    from transformers import AutoModelForCausalLM

    assert plan.shape.total_params == AutoModelForCausalLM.from_pretrained(mid_base).num_parameters()


MEASURE = r"""
import ctypes, gc, json, sys
import torch
from moerge.models.precision import autocast
from moerge.train.config import TrainConfig
from moerge.train.loop import Start, batch_loss, load_start, prepare_for_training
from moerge.train.methods import get_method
from moerge.train.methods.base import InitData

libc = ctypes.CDLL("libc.so.6")


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024


def step(base, dtype, checkpointing, batch, length):
    cfg = TrainConfig(base=base, task="t", dtype=dtype, gradient_checkpointing=checkpointing)
    model, _ = load_start(Start(base), "cpu", dtype=dtype)
    model = prepare_for_training(get_method("lora").prepare(model, cfg, None, InitData()), cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    model.train()
    gc.collect(); libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the high-water mark to the current RSS
    before = status("VmRSS:")
    with autocast("cpu", dtype):
        loss, _ = batch_loss(model, data, [0] * batch, per_task=False)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return status("VmHWM:") - before


base, settings = sys.argv[1], json.loads(sys.argv[2])
torch.set_num_threads(1)
for s in settings:  # warm-up: kernels, thread pools and lazy imports are not the step's memory
    step(base, s["dtype"], s["checkpointing"], 1, 16)
print(json.dumps([step(base, s["dtype"], s["checkpointing"], s["batch"], s["length"]) for s in settings]))
"""


def test_estimate_within_25_percent_of_measured_peak(mid_base):
    """One LoRA step (forward, backward, AdamW) per setting, in a fresh process, peak RSS over the RSS just
    before it (model loaded). glibc is told to serve every allocation above 64 KiB by mmap, so freed tensors
    leave RSS at once and the high-water mark is the live-memory peak, not the allocator's history. The
    estimate's step terms (trainable state, activations, logits) must be within 25% of that; its weights
    term is checked exactly against the loaded model above."""
    settings = [
        {"dtype": "fp32", "checkpointing": False, "batch": 8, "length": 128},
        {"dtype": "bf16", "checkpointing": False, "batch": 8, "length": 128},
        {"dtype": "fp32", "checkpointing": True, "batch": 8, "length": 128},
        {"dtype": "fp32", "checkpointing": False, "batch": 4, "length": 256},
    ]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(mid_base), json.dumps(settings)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    report = []
    for setting, peak in zip(settings, measured, strict=True):
        cfg = TrainConfig(
            base=str(mid_base),
            task="t",
            dtype=setting["dtype"],
            gradient_checkpointing=setting["checkpointing"],
            batch_size=setting["batch"],
            max_length=setting["length"],
        )
        plan = plan_training(cfg, device="cpu")
        estimate = plan.trainable_bytes + plan.activation_bytes + plan.logits_bytes
        report.append((setting, round(peak / 2**20, 1), round(estimate / 2**20, 1)))
    for _, peak_mb, estimate_mb in report:
        assert abs(estimate_mb - peak_mb) <= 0.25 * peak_mb, report


def test_plan_command_and_dry_run_print_the_plan_and_write_nothing(mid_base, tmp_path):
    task = write_task(tmp_path / "parity.jsonl", parity_rows(8))
    result = runner.invoke(app, ["plan", "--base", str(mid_base), "--batch-size", "4", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["method"] == "lora" and plan["dtype"] == "fp32" and plan["fits"] is True
    assert plan["peak_bytes"] == sum(
        plan[k] for k in ("weights_bytes", "trainable_bytes", "activation_bytes", "logits_bytes")
    )
    out = tmp_path / "expert"
    args = ["train", "--base", str(mid_base), "--task", task, "--out", str(out), "--dry-run", "--dtype", "bf16"]
    dry = runner.invoke(app, [*args, "--gradient-checkpointing", "--grad-accum", "4", "--quantize", "4bit"])
    assert dry.exit_code == 0, dry.output
    assert "effective batch 32" in dry.output and "gradient checkpointing on" in dry.output
    assert "base in 4bit" in dry.output and "cannot run here: --quantize needs a CUDA GPU" in dry.output
    assert not out.exists() and not list(tmp_path.glob(".expert*"))


def test_memory_terms_follow_the_formula():
    """The documented formula, by hand, for an 8B-shaped model with LoRA in bf16 and checkpointing."""
    from moerge.train.plan import ModelShape, estimate

    shape = ModelShape("LlamaForCausalLM", 32, 4096, 14336, 128256, 8_030_261_248, 6_979_321_856)
    terms = estimate(
        shape,
        trainable_params=20_971_520,
        trainable_is_base=False,
        dtype="bf16",
        quantize=None,
        batch_size=4,
        max_length=1024,
        checkpointing=True,
    )
    tokens = 4 * 1024
    assert terms["weights_bytes"] == (8_030_261_248 - 0) * 2
    assert terms["trainable_bytes"] == 20_971_520 * 16
    layer, logits = tokens * (29 * 4096 + 8 * 14336), tokens * 128256 * 12
    assert terms["activation_bytes"] == int(32 * tokens * 4096 * 2 + max(0, layer - logits))
    assert terms["logits_bytes"] == logits
    quantized = estimate(
        shape,
        trainable_params=20_971_520,
        trainable_is_base=False,
        dtype="bf16",
        quantize="4bit",
        batch_size=4,
        max_length=1024,
        checkpointing=True,
    )
    assert quantized["weights_bytes"] == int(6_979_321_856 * 0.53 + (8_030_261_248 - 6_979_321_856) * 4)
