#!/usr/bin/env bash
# Second cold-start call (after torchao's coordinate-descent tuning was turned off), two GPUs side by side:
#   GPU 0: fp8 cold, dynamic block graphs, the default warm-up (1024², 512², 512² batch 2), artifacts saved,
#          timed 1024²/28 and /4; then a warm restart from the same cache folder
#   GPU 1: fp8 cold, static graphs, 1024² only (the old compile setting): the same-run speed baseline
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT="${OUT:-bench/results}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
CS=("$PY" -m bench.coldstart --precision fp8 --compile)
gpu0() {
    export CUDA_VISIBLE_DEVICES=0
    echo "=== fp8 cold, dynamic, default warm-up ($(date -u +%T))"
    TORCH_LOGS=recompiles timeout 100 "${CS[@]}" --cache-dir /tmp/c8 --save-artifacts \
        --case 1024x1024:28 --case 1024x1024:4 --json "$OUT/fp8-cold-dyn.json"
    echo "rc=$?"
    echo "=== fp8 warm restart ($(date -u +%T))"
    timeout 50 "${CS[@]}" --cache-dir /tmp/c8 --case 1024x1024:4 --repeats 1
    echo "rc=$?"
}
gpu1() {
    export CUDA_VISIBLE_DEVICES=1
    echo "=== fp8 cold, static, 1024² only ($(date -u +%T))"
    timeout 100 "${CS[@]}" --cache-dir /tmp/c8s --engine-opt compile_dynamic=false --warmup-sizes 1024x1024 \
        --warmup-batch 1 --case 1024x1024:28 --case 1024x1024:4 --json "$OUT/fp8-cold-static.json"
    echo "rc=$?"
}
gpu0 >"$OUT/gpu0.log" 2>&1 &
gpu1 >"$OUT/gpu1.log" 2>&1 &
wait
for g in 0 1; do
    echo "##### GPU $g"; grep -E '^(===|rc=|loaded|warm-up|[0-9]+x[0-9]+:)' "$OUT/gpu$g.log" | cut -c1-300
    grep -o '"dynamo_stats".*"compile_times"' "$OUT/gpu$g.log" | cut -c1-700
    echo "recompiles logged: $(grep -c 'Recompiling' "$OUT/gpu$g.log")"
done
