"""Write data.jsonl ({"input","target","choices","split"} per row) from one BIG-bench multiple-choice task.

Keeps examples with exactly one correct choice, shuffles them with a fixed seed, and takes --test rows
for split=test and the next --train rows for split=train.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIGBENCH = Path("/root/.cache/moerge/bigbench/benchmark_tasks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default="hyperbaton")
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bigbench", default=str(BIGBENCH))
    parser.add_argument("--out", default=str(HERE / "data.jsonl"))
    args = parser.parse_args()

    task = json.loads((Path(args.bigbench) / args.task / "task.json").read_text())
    rows = []
    for ex in task["examples"]:
        scores = ex.get("target_scores") or {}
        correct = [c for c, v in scores.items() if v == 1]
        if len(correct) != 1:
            continue
        rows.append({"input": ex["input"].strip(), "target": correct[0], "choices": list(scores)})
    random.Random(args.seed).shuffle(rows)
    if len(rows) < args.test + args.train:
        raise SystemExit(f"{args.task}: only {len(rows)} usable examples")
    test = [dict(r, split="test") for r in rows[: args.test]]
    train = [dict(r, split="train") for r in rows[args.test : args.test + args.train]]
    with open(args.out, "w") as f:
        for row in train + test:
            f.write(json.dumps(row) + "\n")
    print(f"{args.task}: {len(train)} train, {len(test)} test -> {args.out}")


if __name__ == "__main__":
    main()
