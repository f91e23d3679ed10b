"""Training throughput: `moerge train` against a plain peft + transformers loop, same everything.

Both sides train LoRA (same rank, alpha, targets, lr) on the same task examples, formatted by the
same prompt code, for the same number of steps and batch size. Each side runs in its own
subprocess and reports tokens/s over its optimizer steps (model loading excluded) and peak RSS.

    python benchmarks/train_bench.py --base smollm2-135m-instruct --task gym:leg_counting --steps 12
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_moerge(args: argparse.Namespace) -> dict:
    from moerge.recipes.train import train_expert
    from moerge.train import TrainConfig

    cfg = TrainConfig(
        base=args.base,
        task=args.task,
        method="lora",
        rank=8,
        alpha=16,
        lr=1e-3,
        steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        eval_split=None,
        checkpoint_every=10_000,
    )
    with tempfile.TemporaryDirectory() as tmp:
        meta = train_expert(cfg, Path(tmp) / "expert", progress=False)
    return {
        "tokens_per_s": meta.cost["tokens_per_s"],
        "tokens": meta.cost["train_tokens"],
        "train_time_s": meta.cost["train_time_s"],
    }


def run_plain(args: argparse.Namespace) -> dict:
    """The loop a peft user writes by hand (peft's README style)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moerge.data import load_task
    from moerge.data.formats import MOERGE
    from moerge.data.prompts import encode_for_training
    from moerge.models import resolve_base
    from moerge.train.data import batch_order

    where = resolve_base(args.base)
    tokenizer = AutoTokenizer.from_pretrained(where)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    examples = load_task(args.task).train
    encoded = [encode_for_training(tokenizer, ex, args.max_length, MOERGE) for ex in examples]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.train()
    tokens, elapsed = 0, 0.0
    for step in range(args.steps):
        started = time.perf_counter()
        items = [encoded[i] for i in batch_order(len(encoded), args.batch_size, 0, step)]
        width = max(len(e.input_ids) for e in items)
        ids = torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in items])
        labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in items])
        mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in items])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        elapsed += time.perf_counter() - started
        tokens += int(mask.sum())
    return {"tokens_per_s": round(tokens / elapsed, 1), "tokens": tokens, "train_time_s": round(elapsed, 2)}


SIDES = {"moerge": run_moerge, "plain_peft": run_plain}


def child(args: argparse.Namespace) -> None:
    result = SIDES[args.side](args)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print("RESULT " + json.dumps(result))


def parent(args: argparse.Namespace) -> dict:
    results = {}
    for side in ("plain_peft", "moerge", "plain_peft", "moerge"):  # alternate to spread machine noise
        cmd = [
            sys.executable,
            __file__,
            "--side",
            side,
            "--base",
            args.base,
            "--task",
            args.task,
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--max-length",
            str(args.max_length),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
        run = json.loads(line[len("RESULT ") :])
        best = results.get(side)
        if best is None or run["tokens_per_s"] > best["tokens_per_s"]:
            results[side] = run
    ratio_speed = results["moerge"]["tokens_per_s"] / results["plain_peft"]["tokens_per_s"]
    ratio_mem = results["moerge"]["peak_rss_mb"] / results["plain_peft"]["peak_rss_mb"]
    summary = {
        "sides": results,
        "speed_ratio_moerge_over_plain": round(ratio_speed, 3),
        "peak_rss_ratio_moerge_over_plain": round(ratio_mem, 3),
    }
    print(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--task", default="gym:leg_counting?size=200")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--side", choices=sorted(SIDES))
    args = parser.parse_args()
    child(args) if args.side else parent(args)


if __name__ == "__main__":
    main()
