"""Train a LoRA with plain transformers + peft in the "plain" prompt format, then score the test rows.

No moerge import. Training rows: input = prompt + answer(target), labels -100 on the prompt and the
answer ids (through <|im_end|>) as labels. Saves the adapter with save_pretrained (safetensors,
base_model_name_or_path = --base). Scores test rows with rank classification (plain format) with the
adapter and with the bare base model; writes both to --scores and prints them.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import random
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

from peft import LoraConfig, get_peft_model  # noqa: E402
from plain_format import answer_ids, prompt_ids, score_rows  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

HERE = Path(__file__).resolve().parent
MODEL = "/root/.cache/moerge/models/smollm2-135m-instruct"
OUT = HERE.parents[1] / "runs" / "prompt_formats"


def load_rows(path: str, split: str) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def batches(rows, tok, batch_size, rng):
    order = list(range(len(rows)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [rows[j] for j in order[i : i + batch_size]]
            seqs, labels = [], []
            for r in chunk:
                p = prompt_ids(tok, r["input"])
                a = answer_ids(tok, r["input"], r["target"], p)
                seqs.append(p + a)
                labels.append([-100] * len(p) + a)
            width = max(len(s) for s in seqs)
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            yield (
                torch.tensor([s + [pad] * (width - len(s)) for s in seqs]),
                torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
                torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(HERE / "data.jsonl"))
    parser.add_argument("--base", default=MODEL)
    parser.add_argument("--out", default=str(OUT / "adapter"))
    parser.add_argument("--scores", default=str(OUT / "scores_plain_peft.json"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=9.0, help="stop training early past this")
    parser.add_argument("--skip-base", action="store_true", help="do not score the bare base model")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, use_safetensors=True, dtype=torch.float32)
    train, test = load_rows(args.data, "train"), load_rows(args.data, "test")
    print(f"train {len(train)} rows, test {len(test)} rows", flush=True)

    result = {"base_model": args.base, "data": args.data, "n_train": len(train)}
    if not args.skip_base:
        t0 = time.time()
        base = score_rows(model, tok, test)
        result["base"] = base | {"seconds": round(time.time() - t0, 1)}
        print(f"base   accuracy {base['accuracy']:.4f} (n={base['n']}, {time.time() - t0:.0f}s)", flush=True)

    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / args.steps))
    model.train()
    t0, done = time.time(), 0
    data = batches(train, tok, args.batch_size, random.Random(args.seed))
    for step in range(args.steps):
        ids, mask, labels = next(data)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optim.step()
        sched.step()
        optim.zero_grad()
        done = step + 1
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
        if time.time() - t0 > args.max_minutes * 60:
            print(f"stopping at step {done}: past {args.max_minutes} min", flush=True)
            break
    train_seconds = time.time() - t0
    model.save_pretrained(args.out)
    cfg = json.loads((Path(args.out) / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == args.base, cfg["base_model_name_or_path"]
    print(f"saved adapter to {args.out} ({done} steps, {train_seconds:.0f}s)", flush=True)

    t0 = time.time()
    adapted = score_rows(model, tok, test)
    result["adapter"] = adapted | {"seconds": round(time.time() - t0, 1)}
    result["train"] = {
        "steps": done,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seconds": round(train_seconds, 1),
        "lora": {"r": 8, "alpha": 16, "target_modules": config.target_modules and sorted(config.target_modules)},
        "adapter_dir": args.out,
    }
    print(f"adapter accuracy {adapted['accuracy']:.4f} (n={adapted['n']}, {time.time() - t0:.0f}s)", flush=True)
    Path(args.scores).parent.mkdir(parents=True, exist_ok=True)
    Path(args.scores).write_text(json.dumps(result, indent=1))
    summary = {k: {"accuracy": result[k]["accuracy"], "n": result[k]["n"]} for k in ("base", "adapter") if k in result}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
