"""Score data.jsonl's test rows with lm-evaluation-harness (HF model + peft adapter), plain-format template.

Run with the separate lm-eval venv (/work/lmeval-venv/bin/python). Writes a task YAML (from
lm_eval_task/prompt_formats_plain.yaml.in, pointing at --data) next to a copy of lm_eval_task/utils.py,
then:
  1. token check: for every test row and choice, lm-eval's own _encode_pair(context, continuation)
     is compared with the plain format's prompt ids + answer ids (plain_format.py);
  2. lm_eval.simple_evaluate on the task (dtype float32, like train_plain_peft.py), log_samples on;
  3. if --compare names train_plain_peft.py's scores JSON, per-example predictions and per-choice
     log-likelihoods (relative to choice 0) are compared with the script's.

lm-eval moves the context's trailing whitespace ("\\n" after "assistant") into every continuation, so
each lm-eval log-likelihood carries one extra, choice-independent term log p("\\n" | ..."assistant");
it cancels in the argmax (acc) and in differences between choices.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

HERE = Path(__file__).resolve().parent
MODEL = "/root/.cache/moerge/models/smollm2-135m-instruct"
OUT = HERE.parents[1] / "runs" / "prompt_formats"
TASK = "prompt_formats_plain"


def write_task(data: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "lm_eval_task" / "utils.py", folder / "utils.py")
    text = (HERE / "lm_eval_task" / f"{TASK}.yaml.in").read_text().replace("@DATA@", str(data.resolve()))
    (folder / f"{TASK}.yaml").write_text(text)
    return folder


def token_check(lm, rows) -> dict:
    sys.path.insert(0, str(HERE))
    from lm_eval_task_utils import doc_to_choice, doc_to_text  # type: ignore
    from plain_format import answer_ids, prompt_ids

    tok = lm.tokenizer
    checked, mismatches, extra = 0, [], set()
    for i, row in enumerate(rows):
        prompt = prompt_ids(tok, row["input"])
        context = doc_to_text(row)
        for choice, continuation in zip(row["choices"], doc_to_choice(row), strict=False):
            answer = answer_ids(tok, row["input"], choice, prompt)
            ctx_enc, cont_enc = lm._encode_pair(context, continuation)  # target_delimiter is ""
            checked += 1
            whole_ok = ctx_enc + cont_enc == prompt + answer
            split_ok = cont_enc[-len(answer) :] == answer and ctx_enc + cont_enc[: -len(answer)] == prompt
            if not (whole_ok and split_ok):
                mismatches.append(
                    {"row": i, "choice": choice, "lm_eval": [ctx_enc, cont_enc], "plain": [prompt, answer]}
                )
            extra.add(tok.decode(cont_enc[: -len(answer)]))
    return {
        "pairs_checked": checked,
        "mismatches": len(mismatches),
        "first_mismatches": mismatches[:3],
        "continuation_prefix_before_answer": sorted(extra),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(HERE / "data.jsonl"))
    parser.add_argument("--base", default=MODEL)
    parser.add_argument("--adapter", default=str(OUT / "adapter"), help="peft adapter dir; 'none' for the base model")
    parser.add_argument("--out", default=str(OUT / "scores_lm_eval.json"))
    parser.add_argument("--compare", default=str(OUT / "scores_plain_peft.json"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    os.environ["PF_MODEL_DIR"] = args.base  # read by lm_eval_task/utils.py

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder = write_task(Path(args.data), Path(args.out).parent / "lm_eval_task")
    # utils.py under a unique module name for the token check (lm-eval imports its own copy)
    shutil.copy(HERE / "lm_eval_task" / "utils.py", folder / "lm_eval_task_utils.py")
    sys.path.insert(0, str(folder))

    adapter = None if args.adapter == "none" else args.adapter
    model_args = {"pretrained": args.base, "dtype": "float32", "device": "cpu", "batch_size": args.batch_size}
    if adapter:
        model_args["peft"] = adapter
    lm = HFLM(**model_args)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "test"][: args.limit]
    check = token_check(lm, rows)
    print(
        f"token check: {check['pairs_checked']} (context, choice) pairs, {check['mismatches']} mismatches; "
        f"lm-eval continuation = {check['continuation_prefix_before_answer']!r} + plain answer ids",
        flush=True,
    )

    t0 = time.time()
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(folder)),
        log_samples=True,
        limit=args.limit,
    )
    seconds = time.time() - t0
    acc = results["results"][TASK]["acc,none"]
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    logliks = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    preds = [max(range(len(ll)), key=ll.__getitem__) for ll in logliks]
    out = {
        "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None,
        "model_args": model_args,
        "task": TASK,
        "task_dir": str(folder),
        "accuracy": acc,
        "n": len(samples),
        "predicted": preds,
        "logprobs": logliks,
        "seconds": round(seconds, 1),
        "token_check": check,
    }
    key = "adapter" if adapter else "base"
    if args.compare and Path(args.compare).exists():
        mine = json.loads(Path(args.compare).read_text()).get(key)
        if mine:
            n = min(len(mine["predicted"]), len(preds))
            agree = sum(a == b for a, b in zip(mine["predicted"][:n], preds[:n], strict=False)) / n
            rel = max(
                abs((a[i] - a[0]) - (b[i] - b[0]))
                for a, b in zip(mine["logprobs"][:n], logliks[:n], strict=False)
                for i in range(len(a))
            )
            offset = [b[0] - a[0] for a, b in zip(mine["logprobs"][:n], logliks[:n], strict=False)]
            out["compare"] = {
                "scores_file": args.compare,
                "model": key,
                "script_accuracy": mine["accuracy"],
                "prediction_agreement": agree,
                "max_abs_diff_relative_loglik": rel,
                "lm_eval_minus_script_loglik_choice0": [min(offset), max(offset)],
            }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(
        json.dumps(
            {k: out[k] for k in ("lm_eval_version", "accuracy", "n", "seconds")} | {"compare": out.get("compare")}
        )
    )


if __name__ == "__main__":
    main()
