#!/usr/bin/env bash
# Prompt formats (issue #19): a plain-peft LoRA scored three ways on the same test rows.
#   1. make_data.py        BIG-bench intent_recognition -> data.jsonl (400 train / 200 test)
#   2. train_plain_peft.py transformers + peft LoRA in the plain format; own rank-classification scores
#   3. lm_eval_score.py    lm-evaluation-harness on the same adapter and rows (separate venv)
#   4. moerge              import-peft --prompt-format plain, then eval (recorded format) and eval
#                          --prompt-format moerge (mismatched, for contrast)
# Env overrides: PY (moerge venv python), LMEVAL_PY (lm-eval venv python), MODEL_DIR, OUT, STEPS, LR.
set -euo pipefail
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
MOERGE="${MOERGE:-$ROOT/.venv/bin/moerge}"
LMEVAL_PY="${LMEVAL_PY:-/work/lmeval-venv/bin/python}"
MODEL_DIR="${MODEL_DIR:-/root/.cache/moerge/models/smollm2-135m-instruct}"
OUT="${OUT:-$ROOT/runs/prompt_formats}"
TASK=intent_recognition
DATA="$HERE/data.jsonl"
ADAPTER="$OUT/adapter"
LIB="$OUT/library"
mkdir -p "$OUT"
cd "$HERE"

step() { echo; echo "=== $1 ($(date +%T))"; }
t0=$SECONDS

step "1. data: $TASK"
"$PY" make_data.py --task "$TASK" --train 400 --test 200 --seed 0 --out "$DATA"

step "2. train + score with plain transformers/peft"
t=$SECONDS
"$PY" train_plain_peft.py --data "$DATA" --base "$MODEL_DIR" --out "$ADAPTER" \
    --scores "$OUT/scores_plain_peft.json" --steps "${STEPS:-40}" --lr "${LR:-1e-3}" --batch-size 8
echo "step 2 wall: $((SECONDS - t))s"

step "3. lm-evaluation-harness on the same adapter"
t=$SECONDS
"$LMEVAL_PY" lm_eval_score.py --data "$DATA" --base "$MODEL_DIR" --adapter "$ADAPTER" \
    --out "$OUT/scores_lm_eval.json" --compare "$OUT/scores_plain_peft.json" --batch-size 8
echo "step 3 wall: $((SECONDS - t))s"

step "4. moerge: import-peft --prompt-format plain, eval in the recorded and in the mismatched format"
set +e
t=$SECONDS
rm -rf "$LIB"
"$MOERGE" library create "$LIB" &&
"$MOERGE" library import-peft "$LIB" "$ADAPTER" --task "$TASK" --base "$MODEL_DIR" --name plain-peft --prompt-format plain &&
"$MOERGE" library show "$LIB" plain-peft
rc_import=$?
"$MOERGE" eval --base "$MODEL_DIR" --adapter "$LIB/plain-peft" --task "$DATA" --split test --json \
    | tee "$OUT/moerge_eval_plain.json"
rc_plain=${PIPESTATUS[0]}
"$MOERGE" eval --base "$MODEL_DIR" --adapter "$LIB/plain-peft" --task "$DATA" --split test --prompt-format moerge --json \
    | tee "$OUT/moerge_eval_moerge.json"
rc_moerge=${PIPESTATUS[0]}
echo "step 4 wall: $((SECONDS - t))s (exit codes: import $rc_import, eval plain $rc_plain, eval moerge $rc_moerge)"
set -e

step "summary"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    p = out / name
    try:
        return json.loads(p.read_text())
    except Exception:
        return None
own, lm = load("scores_plain_peft.json"), load("scores_lm_eval.json")
if own:
    for k in ("base", "adapter"):
        if k in own:
            print(f"script  {k:7s} acc {own[k]['accuracy']:.4f}  n={own[k]['n']}")
if lm:
    print(f"lm-eval adapter acc {lm['accuracy']:.4f}  n={lm['n']}  (lm-eval {lm['lm_eval_version']})")
    if lm.get("compare"):
        c = lm["compare"]
        print(f"        prediction agreement with script {c['prediction_agreement']:.4f}, "
              f"max |relative loglik diff| {c['max_abs_diff_relative_loglik']:.2e}")
for name in ("moerge_eval_plain.json", "moerge_eval_moerge.json"):
    print(f"{name}: {load(name)}")
EOF
echo "total wall: $((SECONDS - t0))s"
