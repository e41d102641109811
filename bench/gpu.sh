#!/usr/bin/env bash
# bench/gpu.sh: the project's GPU checks in one run, under 8 minutes on one GPU.
#
#   1. tests/test_gpu.py on the GPU: logits, gradients, beam search and Adafactor against
#      their oracles on CUDA, a bf16 step against fp32, and scaled_dot_product_attention
#      with T5's position bias running the memory-efficient kernel (not the math kernel)
#      in bf16 forward and backward, as bench/memory_plan.py assumes;
#   2. bench/train.py at t5-base and mt5-large shapes in bf16 against transformers: step
#      time, tokens/s, FLOPs, MFU against the card's bf16 peak; for mt5-large also the
#      stage-2 peak memory with and without activation checkpointing against
#      bench/memory_plan.py's prediction;
#   3. bench/generate.py at the same shapes in bf16 against transformers;
# then one summary table (markdown, for the README). Every part runs under its own time
# limit, so the whole stays under 8 minutes; each part's full output is in $GPU_LOGS
# (a temporary folder unless set), the random checkpoints in $GPU_LOGS/checkpoints.
# Without a CUDA device it says so in one line and exits 0.
#
#     bash bench/gpu.sh            # PYTHON=... to choose the interpreter [.venv/bin/python, else python]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "bench/gpu.sh: no CUDA device visible; GPU checks skipped, nothing measured"
    exit 0
fi

LOGS=${GPU_LOGS:-$(mktemp -d)}
CKPT=$LOGS/checkpoints
mkdir -p "$CKPT"
CARD=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')
START=$(date +%s)
ROWS=()
FAILED=0

check() {  # check NAME LIMIT_SECONDS COMMAND...: run it, keep its log, add a row with its last line
    local name=$1 limit=$2
    shift 2
    local t0 rc secs status last
    t0=$(date +%s)
    echo "== $name (at most ${limit} s): $*"
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    secs=$(( $(date +%s) - t0 ))
    status=ok
    if [ "$rc" -eq 124 ]; then status="timed out"; elif [ "$rc" -ne 0 ]; then status="failed (exit $rc)"; fi
    [ "$status" = ok ] || FAILED=1
    grep -v -e 'Warning' -e 'Loading weights' -e 'tied weights' "$LOGS/$name.log" | tail -n 25
    last=$(grep -v '^[[:space:]]*$' "$LOGS/$name.log" | tail -n 1)
    ROWS+=("| $name | $status | $secs | ${last//|/\/} |")
}

TRAIN="bench/train.py --device cuda --dtype bfloat16"
GENERATE="bench/generate.py --device cuda --dtype bfloat16 --beams 4"
check cuda-tests 90 "$PY" -m pytest -q -rs -s tests/test_gpu.py
check train-t5-base 80 "$PY" $TRAIN --shape t5-base --batch 16 --src 512 --tgt 64 --steps 5 --ckpt "$CKPT/t5-base"
check generate-t5-base 50 "$PY" $GENERATE --shape t5-base --batch 32 --src 256 --new 64 --ckpt "$CKPT/t5-base"
check train-mt5-large 160 "$PY" $TRAIN --shape mt5-large --batch 8 --src 512 --tgt 64 --steps 3 --memory \
    --ckpt "$CKPT/mt5-large"
check generate-mt5-large 70 "$PY" $GENERATE --shape mt5-large --batch 16 --src 256 --new 64 --iters 2 \
    --ckpt "$CKPT/mt5-large"

echo
echo "bench/gpu.sh on $CARD, $(date -u +%F), $(( $(date +%s) - START )) s in all; logs in $LOGS"
echo "| check | status | seconds | result (last line) |"
echo "|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
exit "$FAILED"
