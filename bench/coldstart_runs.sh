#!/usr/bin/env bash
# Cold start, warm restart and compile-mode runs behind docs/BENCHMARKS.md ("Cold start"), one device call of
# two GPUs, results under $OUT (at most 8 files come back from the device tool):
#   GPU 0: fp8 cold with the default warm-up (1024², 512², 512² batch 2) and dynamic block graphs, with
#          TORCH_LOGS=recompiles,graph_breaks; saves the portable artifacts; then a warm restart (same cache
#          folder) and a start from the artifacts file alone (fresh cache folder)
#   GPU 1: fp8 with static graphs, one size (the old behaviour, the same-run baseline for speed and compile
#          time); schnell 1024²/4 bf16 with and without a compiled VAE decoder; fp4 memory while serving
# Environment: PYTHON (default python3), COLD_TIMEOUT (s, default 330).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT="${OUT:-bench/results}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
CS=("$PY" -m bench.coldstart)

gpu0() {
    export CUDA_VISIBLE_DEVICES=0
    echo "=== fp8 cold, dynamic, default warm-up ($(date -u +%T))"
    TORCH_LOGS=recompiles,graph_breaks timeout "${COLD_TIMEOUT:-330}" "${CS[@]}" --precision fp8 --compile \
        --cache-dir /tmp/c8 --save-artifacts --case 1024x1024:28 --case 1024x1024:4 --json "$OUT/fp8-cold.json"
    echo "rc=$?"
    echo "=== fp8 warm restart ($(date -u +%T))"
    timeout 150 "${CS[@]}" --precision fp8 --compile --cache-dir /tmp/c8 --case 1024x1024:28 --repeats 1
    echo "rc=$?"
    echo "=== fp8 from the artifacts file alone ($(date -u +%T))"
    mkdir -p /tmp/c8b && cp /tmp/c8/artifacts-*.bin /tmp/c8b/ && ls -la /tmp/c8b
    TORCHINDUCTOR_CACHE_DIR=/tmp/c8b timeout 150 "${CS[@]}" --precision fp8 --compile --cache-dir /tmp/c8b \
        --case 1024x1024:4 --repeats 1
    echo "rc=$?"
}

gpu1() {
    export CUDA_VISIBLE_DEVICES=1
    echo "=== fp8 static, 1024² only (old behaviour) ($(date -u +%T))"
    TORCH_LOGS=recompiles,graph_breaks timeout "${COLD_TIMEOUT:-330}" "${CS[@]}" --precision fp8 --compile \
        --cache-dir /tmp/c8s --engine-opt compile_dynamic=false --warmup-sizes 1024x1024 --warmup-batch 1 \
        --case 1024x1024:28 --case 1024x1024:4 --json "$OUT/fp8-static.json"
    echo "rc=$?"
    for vae in false true; do
        echo "=== schnell bf16 compile, compile_vae=$vae ($(date -u +%T))"
        timeout 120 "${CS[@]}" --model dummy:flux.1-schnell --compile --cache-dir /tmp/cs \
            --engine-opt compile_vae=$vae --warmup-sizes 1024x1024 --warmup-batch 1 --case 1024x1024:4 --repeats 4
        echo "rc=$?"
    done
    echo "=== fp4 memory ($(date -u +%T))"
    timeout 100 "$PY" -m bench.memprobe --precision fp4 --cache-dir /tmp/c4
    echo "rc=$?"
    echo "=== fp4 memory, expandable segments, batch 1 ($(date -u +%T))"
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 90 "$PY" -m bench.memprobe --precision fp4 \
        --cache-dir /tmp/c4 --warmup-batch 1
    echo "rc=$?"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c 'import torch, diffusers, torchao; print(torch.__version__, diffusers.__version__, torchao.__version__)'
gpu0 >"$OUT/gpu0.log" 2>&1 &
gpu1 >"$OUT/gpu1.log" 2>&1 &
wait
for g in 0 1; do
    echo "##### GPU $g"; grep -E '^(===|rc=|loaded|warm-up|compile times|[0-9]+x[0-9]+:|RESULT|fp4|mem)' "$OUT/gpu$g.log" | cut -c1-600
    echo "recompiles logged: $(grep -c 'Recompiling' "$OUT/gpu$g.log") graph breaks: $(grep -ci 'graph break' "$OUT/gpu$g.log")"
done
