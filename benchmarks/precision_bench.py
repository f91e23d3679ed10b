"""Precision and memory: `moerge train` in fp32 vs bf16, with and without gradient checkpointing.

Every setting trains the same LoRA (r=8 on all 7 projections) on SmolLM2-135M for the same steps, at
batch 8 and max length 512, in its own subprocess (so peak RSS is its own). The data is continued
pre-training on generated arithmetic text cut into 512-token blocks, so every sequence is full length
and every position is scored: the case `moerge plan` estimates. Reported per setting: tokens/s over the
optimizer steps (model loading excluded), the child's peak RSS, RSS just after the imports (the
framework's own), the plan's estimate, and each setting's ratios against fp32 without checkpointing.

    python benchmarks/precision_bench.py --base smollm2-135m-instruct --steps 6

Run it on a quiet machine (other processes on the cores change tokens/s several-fold).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {
    "fp32": {"dtype": "fp32", "gradient_checkpointing": False},
    "bf16": {"dtype": "bf16", "gradient_checkpointing": False},
    "fp32+ckpt": {"dtype": "fp32", "gradient_checkpointing": True},
    "bf16+ckpt": {"dtype": "bf16", "gradient_checkpointing": True},
}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_text(folder: Path, n: int = 3000) -> Path:
    """Plain arithmetic sentences, enough for steps × batch blocks of 512 tokens."""
    import random

    rng = random.Random(0)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        lines.append(f"The sum of {a} and {b} is {a + b}, and their difference is {a - b}.")
    path = folder / "arithmetic.txt"
    path.write_text("\n\n".join(" ".join(lines[i : i + 10]) for i in range(0, n, 10)))
    return path


def child(args: argparse.Namespace) -> None:
    import torch  # noqa: F401  (the framework's own memory is measured after the imports)
    import transformers  # noqa: F401

    from moerge.recipes.train import train_expert
    from moerge.train import TrainConfig
    from moerge.train.plan import plan_training

    baseline = rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            base=args.base,
            type="pretrain",
            text=[str(write_text(Path(tmp)))],
            method="lora",
            rank=8,
            alpha=16,
            lr=1e-3,
            steps=args.steps,
            batch_size=args.batch_size,
            max_length=args.max_length,
            eval_split=None,
            checkpoint_every=10_000,
            **SETTINGS[args.setting],
        )
        plan = plan_training(cfg, device="cpu")
        meta = train_expert(cfg, Path(tmp) / "expert", progress=False)
    result = {
        "tokens_per_s": meta.cost["tokens_per_s"],
        "tokens": meta.cost["train_tokens"],
        "train_time_s": meta.cost["train_time_s"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_after_imports_mb": round(baseline, 1),
        "plan_estimate_mb": round(plan.peak_bytes / 2**20, 1),
    }
    print("RESULT " + json.dumps(result))


def parent(args: argparse.Namespace) -> dict:
    results = {}
    for name in SETTINGS:
        cmd = [sys.executable, __file__, "--setting", name, "--base", args.base, "--steps", str(args.steps)]
        cmd += ["--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name}: failed\n{proc.stderr[-3000:]}")
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
        results[name] = json.loads(line[len("RESULT ") :])
        print(name, results[name], file=sys.stderr)
    ref = results["fp32"]
    for run in results.values():
        run["speed_vs_fp32"] = round(run["tokens_per_s"] / ref["tokens_per_s"], 3)
        run["peak_rss_vs_fp32"] = round(run["peak_rss_mb"] / ref["peak_rss_mb"], 3)
        step = run["peak_rss_mb"] - run["rss_after_imports_mb"]
        run["estimate_vs_measured"] = round(run["plan_estimate_mb"] / step, 3) if step > 0 else None
    print(json.dumps(results, indent=2))
    print("\n| setting | tokens/s | × fp32 | peak RSS (MB) | × fp32 | plan estimate (MB) | estimate / (peak − base) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, run in results.items():
        print(
            f"| {name} | {run['tokens_per_s']} | {run['speed_vs_fp32']} | {run['peak_rss_mb']:.0f} |"
            f" {run['peak_rss_vs_fp32']} | {run['plan_estimate_mb']:.0f} | {run['estimate_vs_measured']} |"
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--setting", choices=sorted(SETTINGS))
    args = parser.parse_args()
    child(args) if args.setting else parent(args)


if __name__ == "__main__":
    main()
