#!/usr/bin/env bash
# GPU check of issue #14: on a machine with a CUDA GPU, train a LoRA expert on SmolLM2-135M in bf16 and
# with --quantize 4bit (QLoRA; needs `pip install -e '.[quantize]'`), evaluate both on the GPU, and print
# tokens/s, peak GPU memory (torch's allocator peak, recorded in moerge.json) and `moerge plan`'s estimate.
#
#     bash benchmarks/gpu_check.sh            # MOERGE=... PYTHON=... to override the commands
#
# Exit status: 0 when every step ran; the first failing command's status otherwise.
set -euo pipefail

PYTHON=${PYTHON:-python}
MOERGE=${MOERGE:-"$PYTHON -m moerge.cli"}
BASE=${BASE:-smollm2-135m-instruct}
TASK=${TASK:-"gym:leg_counting?size=400"}
STEPS=${STEPS:-60}
WORK=${WORK:-$(mktemp -d)}
COMMON=(--task "$TASK" --steps "$STEPS" --batch-size 8 --max-length 256 --rank 8 --eval-limit 100)

$PYTHON - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible to torch; run this on a GPU machine")
name = torch.cuda.get_device_name()
print(f"gpu_check: {name}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}, torch {torch.__version__}")
EOF

$MOERGE models fetch "$BASE" >/dev/null

run() {  # name, extra train options...
  local name=$1; shift
  echo "== $name"
  $MOERGE plan --base "$BASE" "${COMMON[@]}" "$@" | sed 's/^/   /'
  $MOERGE train --base "$BASE" "${COMMON[@]}" "$@" --out "$WORK/$name" --overwrite
  $PYTHON - "$WORK/$name" <<'EOF'
import json, sys
meta = json.load(open(f"{sys.argv[1]}/moerge.json"))
cost = meta["cost"]
print(f"   {sys.argv[1]}: dtype={meta.get('dtype')} quantize={meta.get('quantize')} "
      f"tokens/s={cost['tokens_per_s']} peak GPU memory={cost['peak_memory_mb']} MB "
      f"train time={cost['train_time_s']} s accuracy={meta['metrics'].get('test', {}).get('accuracy')}")
EOF
  $MOERGE eval --base "$BASE" --adapter "$WORK/$name" --task "$TASK" --limit 100 --device cuda --dtype bf16 --json \
    | $PYTHON -c "import json,sys; m=json.load(sys.stdin); print(f\"   eval on cuda/bf16: accuracy {m['accuracy']} on {m['n']}\")"
}

run bf16 --dtype bf16
run bf16-ckpt --dtype bf16 --gradient-checkpointing
if $PYTHON -c "import bitsandbytes" 2>/dev/null; then
  run qlora-4bit --dtype bf16 --quantize 4bit --gradient-checkpointing
else
  echo "== qlora-4bit skipped: bitsandbytes is not installed (pip install -e '.[quantize]')"
fi
echo "gpu_check: done ($WORK)"
