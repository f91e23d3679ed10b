"""Training recipes on the real model: lora vs hft vs full, and plain fine-tuning vs self_train.

For each run: the task score (test split), forgetting (the model's LM loss on a general-text probe
minus the base's), train time and trainable parameters. The task is split into 64 labelled
training examples and a test set; the self-training pool is the same generator with another seed.

    MOERGE_HOME=/tmp/mh7 python benchmarks/recipes_bench.py --task gym:leg_counting --steps 24
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

PROBE = [
    "The river flows from the mountains to the sea, passing through forests and small towns.",
    "In 1969, astronauts landed on the Moon for the first time and walked on its surface.",
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar and oxygen.",
    "The library opens at nine in the morning and closes at six in the evening on weekdays.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Regular exercise, a balanced diet and enough sleep help people stay healthy.",
    "The committee will meet next week to discuss the budget for the coming year.",
    "Water boils at one hundred degrees Celsius at sea level.",
]


def probe_loss(model, tokenizer) -> float:
    """Mean next-token loss on the general-text probe (every token counts)."""
    import torch

    losses = []
    with torch.no_grad():
        for text in PROBE:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    return sum(losses) / len(losses)


def write_split_task(spec: str, folder: Path, n_train: int, n_test: int) -> str:
    """The task's examples as a jsonl with fixed splits: n_train labelled, a few validation, n_test test."""
    from moerge.data import load_task

    task = load_task(spec, seed=0)
    examples = [*task.train, *task.validation, *task.test]
    rows = []
    for i, ex in enumerate(examples[: n_train + n_test + 4]):
        split = "train" if i < n_train else "test" if i < n_train + n_test else "validation"
        rows.append({**ex.to_dict(), "split": split})
    path = folder / "labelled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def measure(folder: Path, base: str, base_probe: float) -> dict:
    from moerge.library.expert import read_expert_meta
    from moerge.library.loading import load_model

    meta = read_expert_meta(folder)
    model, tok = load_model(base, folder)
    return {
        "score": meta.metrics.get("test", {}).get("accuracy"),
        "forgetting": round(probe_loss(model, tok) - base_probe, 4),
        "train_time_s": meta.cost["train_time_s"],
        "trainable_params": meta.cost["trainable_params"],
        "stages": len(getattr(meta, "stages", []) or []),
        "extra": next(
            (s for s in getattr(meta, "stages", []) or [] if s.get("type") == "self_train:pseudo_label"), None
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--task", default="gym:leg_counting")
    parser.add_argument("--pool-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--test", type=int, default=64)
    parser.add_argument("--confidence", type=float, default=0.5)
    parser.add_argument("--only", default="", help="comma-separated subset of runs")
    args = parser.parse_args()

    from moerge.data import load_task
    from moerge.data.formats import MOERGE
    from moerge.eval.evaluate import evaluate_task
    from moerge.models import fetch_model, load_base
    from moerge.recipes.train import train_expert
    from moerge.train import TrainConfig
    from moerge.train.config import staged_from_dict

    base = str(fetch_model(args.base)) if "/" not in args.base else args.base
    work = Path(tempfile.mkdtemp(prefix="recipes_bench."))
    labelled = write_split_task(args.task, work, 64, args.test)
    joiner = "&" if "?" in args.task else "?"
    pool = f"{args.task}{joiner}size={args.pool_size}&seed=1" if "gym:" in args.task else args.task
    model, tok = load_base(base)
    base_probe = probe_loss(model, tok)
    base_score = evaluate_task(model, tok, load_task(labelled), fmt=MOERGE, split="test", progress=False)["accuracy"]
    print(json.dumps({"base": {"score": base_score, "probe_loss": round(base_probe, 4)}}), flush=True)
    del model
    common = {
        "steps": args.steps,
        "batch_size": 8,
        "max_length": 128,
        "eval_limit": args.test,
        "checkpoint_every": 10_000,
    }

    def single(method: str, lr: float):
        cfg = TrainConfig(base=base, task=labelled, method=method, lr=lr, **common)
        return lambda out: train_expert(cfg, out, progress=False)

    def self_train(**options):
        stage = {"type": "self_train", "task": labelled, "unlabelled": pool, "confidence": args.confidence, **options}
        recipe = staged_from_dict({"base": base, "method": "lora", "lr": 1e-3, **common, "stages": [stage]})
        return lambda out: train_expert(recipe, out, progress=False)

    runs = {
        "lora": single("lora", 1e-3),
        "hft": single("hft", 2e-5),
        "full": single("full", 2e-5),
        "self_train (lora)": self_train(),
        "self_train top-25% (lora)": self_train(keep_top=0.25),
    }  # fmt: skip
    chosen = [r.strip() for r in args.only.split(",") if r.strip()] or list(runs)
    results = {"base (no training)": {"score": base_score, "forgetting": 0.0, "train_time_s": 0, "trainable_params": 0}}
    for name in chosen:
        started = time.time()
        out = work / re.sub(r"[^A-Za-z0-9_-]+", "_", name)
        runs[name](out)
        results[name] = {**measure(out, base, base_probe), "wall_s": round(time.time() - started, 1)}
        print(json.dumps({name: results[name]}), flush=True)
    print(f"base probe loss: {base_probe:.4f}")
    print("| run | task score | forgetting (probe loss Δ) | train time (s) | trainable params |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        score = "–" if r["score"] is None else f"{r['score']:.3f}"
        print(f"| {name} | {score} | {r['forgetting']:+.4f} | {r['train_time_s']:.0f} | {r['trainable_params']:,} |")


if __name__ == "__main__":
    main()
