#!/usr/bin/env bash
# The GPU runs behind docs/BENCHMARKS.md, each one device call (results under $OUT).
#
#   bench/device_runs.sh single    one GPU: raw (in-process) bf16 and fp4 eager at 1024²/28 and 512²/28,
#                                  then the same through HTTP (start_multi_gpu.sh: one worker + nginx),
#                                  then compiled bf16 and fp4: raw and through HTTP, 1024²/28
#   bench/device_runs.sh scaling   1, 2, 4 bf16 workers through nginx, 512²/28, 2 clients per GPU, with
#                                  monitor_multi_gpu.sh --once snapshots taken during the load
#   bench/device_runs.sh e2e       compiled bf16 1024²/28: raw loop, then one worker + nginx at 1 and 2
#                                  clients (FLUX_MAX_CONCURRENT=1, so 2 clients overlap PNG work with the GPU)
#   bench/device_runs.sh tune NAME...  single-GPU experiments side by side, the i-th on GPU i: cudnn (attention
#                                  kernels, then compiled bf16 with cuDNN attention), autotune (max-autotune),
#                                  fp8 (compiled), nf4 and fp4 (compiled, three sizes: does a new size recompile?),
#                                  attention (the kernels alone)
#
# Environment: OUT (results folder, default bench/results), PYTHON (default python3), ITEM_TIMEOUT (seconds per item, default 200),
# SCALING_GPUS (default 1,2,4), SCALING_COMPILE (FLUX_COMPILE of the scaling workers, default 0),
# SCALING_REQUESTS (measured requests per GPU, default 8).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

OUT="${OUT:-bench/results}"
MODEL="${BENCH_MODEL:-dummy:flux.1-dev}"   # dummy:tiny tries the script on a CPU
PY="${PYTHON:-python3}"
export FLUX_PYTHON="${FLUX_PYTHON:-$(command -v "$PY")}"   # the workers use the same interpreter
ITEM_TIMEOUT="${ITEM_TIMEOUT:-200}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FLUX_COMPILE_CACHE_DIR=/tmp/flux-inductor
if [[ -d .whl && ! -e /tmp/site/.installed ]]; then
    python3 -m pip install -q --upgrade --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null &&
        touch /tmp/site/.installed
fi
[[ -e /tmp/site/.installed && ":${PYTHONPATH:-}:" != *:/tmp/site:* ]] && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
if [[ -d .deb && ! -x /tmp/ngx/bin/nginx ]]; then
    mkdir -p /tmp/ngx/bin /tmp/ngx/logs && for f in .deb/*.deb; do dpkg -x "$f" /tmp/ngx; done
    printf '#!/bin/sh\nexec /tmp/ngx/usr/sbin/nginx -e /tmp/ngx/logs/error.log "$@"\n' >/tmp/ngx/bin/nginx
    chmod +x /tmp/ngx/bin/nginx
fi
# every run puts it on PATH, also a later one that finds it already unpacked
[[ -x /tmp/ngx/bin/nginx ]] && export PATH="/tmp/ngx/bin:$PATH"

STACK=(env BASE_PORT=8100 NGINX_PORT=8180 NUM_GPUS=1 "FLUX_MODEL=$MODEL" FLUX_DRAIN_TIMEOUT=5
       FLUX_LOG_DIR="$OUT/logs" FLUX_RUN_DIR=/tmp/flux-run ./start_multi_gpu.sh)
URL=http://127.0.0.1:8180

item() {  # item NAME COMMAND...: run with a deadline, keep its log, print its last lines
    local name="$1"; shift
    echo "=== $name ($(date -u +%T))"
    timeout "$ITEM_TIMEOUT" "$@" >"$OUT/$name.log" 2>&1
    echo "rc=$?"
    grep -v -i 'warn' "$OUT/$name.log" | tail -n "${TAIL:-14}"
}

raw() {  # raw NAME ARGS...
    local name="$1"; shift
    item "$name" "$PY" -m bench.raw --model "$MODEL" --repeats 2 --warmups 1 --json "$OUT/$name.json" "$@"
}

http_pair() {  # http_pair NAME PRECISION COMPILE RAW_JSON: one worker + nginx, 1024²/28 (then 512²/28 eager)
    local name="$1" prec="$2" compile="$3" raw_json="$4" sizes=auto
    [[ "$compile" == 1 ]] && sizes=1024x1024
    item "$name-start" env FLUX_COMPILE="$compile" FLUX_WARMUP_SIZES="$sizes" "${STACK[@]}" start -m "$prec" </dev/null
    item "$name-1024" "$PY" -m bench.http --url "$URL" --concurrency 1 --requests 3 --warmup 1 \
        --width 1024 --height 1024 --steps 28 --raw-baseline "$raw_json" --json "$OUT/$name-1024.json"
    if [[ "$compile" == 0 ]]; then
        item "$name-512" "$PY" -m bench.http --url "$URL" --concurrency 1,2 --requests 4 --warmup 2 \
            --width 512 --height 512 --steps 28 --raw-baseline "$raw_json" --json "$OUT/$name-512.json"
    fi
    curl -s "http://127.0.0.1:8100/queue-stats" >"$OUT/$name-queue-stats.json"
    TAIL=30 item "$name-monitor" env BASE_PORT=8100 NGINX_PORT=8180 NUM_GPUS=1 FLUX_RUN_DIR=/tmp/flux-run \
        ./monitor_multi_gpu.sh --once
    item "$name-stop" "${STACK[@]}" stop
}

single() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
    raw raw-bf16 --precision bf16 --case 1024x1024:28:1 --case 512x512:28:1 --case 512x512:28:2
    raw raw-fp4 --precision fp4 --case 1024x1024:28:1 --case 512x512:28:1 --max-resident-gib 9
    http_pair http-bf16 bf16 0 "$OUT/raw-bf16.json"
    http_pair http-fp4 fp4 0 "$OUT/raw-fp4.json"
    raw raw-bf16-compile --precision bf16 --compile --compile-cache-dir /tmp/flux-inductor --case 1024x1024:28:1
    http_pair http-bf16-compile bf16 1 "$OUT/raw-bf16-compile.json"
    raw raw-fp4-compile --precision fp4 --compile --compile-cache-dir /tmp/flux-inductor --case 1024x1024:28:1 --max-resident-gib 9
}

monitor_samples() {  # monitor_samples FILE: a --once snapshot every 5 s while workers are up (background)
    while sleep 5; do
        if [[ -s /tmp/flux-run/state ]]; then
            { echo "--- $(date -u +%T)"; FLUX_RUN_DIR=/tmp/flux-run BASE_PORT=8100 NGINX_PORT=8180 \
                ./monitor_multi_gpu.sh --once 2>&1; } >>"$1"
        fi
    done
}

scaling() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
    monitor_samples "$OUT/scaling-monitor${SCALING_COMPILE:+-c$SCALING_COMPILE}.log" &
    local sampler=$!
    local stack="FLUX_MODEL=$MODEL FLUX_COMPILE=${SCALING_COMPILE:-0} FLUX_WARMUP_SIZES=512x512"
    stack+=" FLUX_DRAIN_TIMEOUT=5 FLUX_LOG_DIR=$OUT/logs FLUX_RUN_DIR=/tmp/flux-run BASE_PORT=8100 NGINX_PORT=8180"
    ITEM_TIMEOUT="${SCALING_TIMEOUT:-560}" TAIL=40 item scaling "$PY" -m bench.http --url "$URL" \
        --start "$stack ./start_multi_gpu.sh start -m bf16" --stop "$stack ./start_multi_gpu.sh stop" \
        --gpus "${SCALING_GPUS:-1,2,4}" --concurrency 2 --requests "${SCALING_REQUESTS:-8}" --warmup -1 \
        --width 512 --height 512 --steps 28 --json "$OUT/scaling${SCALING_COMPILE:+-c$SCALING_COMPILE}.json"
    kill "$sampler" 2>/dev/null
    echo "monitor snapshots: $(grep -c '^--- ' "$OUT/scaling-monitor${SCALING_COMPILE:+-c$SCALING_COMPILE}.log" 2>/dev/null)"
}

e2e() {  # compiled bf16 at 1024²/28: the raw loop, then one worker + nginx at 1 and 2 clients
    raw raw-bf16-compile --precision bf16 --compile --compile-cache-dir /tmp/flux-inductor --case 1024x1024:28:1 \
        --repeats 4
    item e2e-start env FLUX_COMPILE=1 FLUX_WARMUP_SIZES=1024x1024 FLUX_MAX_CONCURRENT=1 "${STACK[@]}" start -m bf16 </dev/null
    item e2e-1024 "$PY" -m bench.http --url "$URL" --concurrency 1,2 --requests 6 --warmup 1 \
        --width 1024 --height 1024 --steps 28 --raw-baseline "$OUT/raw-bf16-compile.json" --json "$OUT/e2e-1024.json"
    item e2e-stop "${STACK[@]}" stop
}

on_gpu() {  # on_gpu INDEX COMMAND...: one experiment pinned to one GPU, its output kept in $OUT/gpuINDEX.log
    local gpu="$1"; shift
    (export CUDA_VISIBLE_DEVICES="$gpu"; "$@") >"$OUT/gpu$gpu.log" 2>&1
}

experiment() {  # experiment NAME: one single-GPU tuning run (see tune)
    local cc=(--compile --compile-cache-dir /tmp/flux-inductor)
    case "$1" in
        cudnn)  # attention kernels alone, then compiled bf16 with cuDNN attention, phase by phase
            "$PY" -m bench.attention --json "$OUT/attention.json"
            "$PY" -m bench.raw --precision bf16 "${cc[@]}" --case 1024x1024:28:1 --profile \
                --engine-opt attention_backend=_native_cudnn --json "$OUT/raw-bf16-cudnn.json" ;;
        autotune)
            "$PY" -m bench.raw --precision bf16 "${cc[@]}" --case 1024x1024:28:1 --profile \
                --engine-opt compile_mode=max-autotune-no-cudagraphs --json "$OUT/raw-bf16-autotune.json" ;;
        fp8)
            "$PY" -m bench.raw --precision fp8 "${cc[@]}" --case 1024x1024:28:1 --profile --json "$OUT/raw-fp8.json" ;;
        nf4)  # nf4 against fp4 (both compiled), and whether a third size after two recompiles
            "$PY" -m bench.raw --precision fp4 --fp4-quant-type nf4 "${cc[@]}" --case 1024x1024:28:1 \
                --case 512x512:28:1 --case 768x1344:28:1 --max-resident-gib 9 --json "$OUT/raw-nf4.json" ;;
        fp4)  # the same three sizes as nf4, for the comparison
            "$PY" -m bench.raw --precision fp4 "${cc[@]}" --case 1024x1024:28:1 --case 512x512:28:1 \
                --case 768x1344:28:1 --max-resident-gib 9 --json "$OUT/raw-fp4.json" ;;
        attention) "$PY" -m bench.attention --json "$OUT/attention.json" ;;
        *) echo "unknown experiment $1" >&2; return 2 ;;
    esac
}

tune() {  # tune NAME[,NAME...]...: the i-th argument's experiments on GPU i (one after another), side by side
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
    local gpu=0 name
    for name in "$@"; do
        on_gpu "$gpu" timeout "${TUNE_TIMEOUT:-520}" bash "${BASH_SOURCE[0]}" experiment "$name" &
        gpu=$((gpu + 1))
    done
    wait
    for ((gpu = 0; gpu < $#; gpu++)); do echo "=== GPU $gpu"; grep -v -i warn "$OUT/gpu$gpu.log" | tail -n 25; done
}

case "${1:-}" in
    single) single ;;
    scaling) scaling ;;
    e2e) e2e ;;
    tune) shift; tune "$@" ;;
    experiment) IFS=, read -ra names <<<"$2"; for n in "${names[@]}"; do experiment "$n"; done ;;
    *) sed -n '2,19p' "${BASH_SOURCE[0]}"; exit 2 ;;
esac
