#!/usr/bin/env bash
# The GPU runs behind docs/BENCHMARKS.md, each one device call (results under $OUT).
#
#   bench/device_runs.sh single    one GPU: raw (in-process) bf16 and fp4 eager at 1024²/28 and 512²/28,
#                                  then the same through HTTP (start_multi_gpu.sh: one worker + nginx),
#                                  then compiled bf16 and fp4: raw and through HTTP, 1024²/28
#   bench/device_runs.sh scaling   1, 2, 4 bf16 workers through nginx, 512²/28, 2 clients per GPU
#
# Environment: OUT (results folder, default bench/results), PYTHON (default python3), ITEM_TIMEOUT (seconds per item, default 200),
# SCALING_GPUS (default 1,2,4), SCALING_COMPILE (FLUX_COMPILE of the scaling workers, default 0).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

OUT="${OUT:-bench/results}"
MODEL="${BENCH_MODEL:-dummy:flux.1-dev}"   # dummy:tiny tries the script on a CPU
PY="${PYTHON:-python3}"
export FLUX_PYTHON="${FLUX_PYTHON:-$(command -v "$PY")}"   # the workers use the same interpreter
ITEM_TIMEOUT="${ITEM_TIMEOUT:-200}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FLUX_COMPILE_CACHE_DIR=/tmp/flux-inductor
if [[ -d .whl ]]; then
    python3 -m pip install -q --upgrade --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null &&
        export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
if [[ -d .deb ]]; then
    mkdir -p /tmp/ngx/bin /tmp/ngx/logs && for f in .deb/*.deb; do dpkg -x "$f" /tmp/ngx; done
    printf '#!/bin/sh\nexec /tmp/ngx/usr/sbin/nginx -e /tmp/ngx/logs/error.log "$@"\n' >/tmp/ngx/bin/nginx
    chmod +x /tmp/ngx/bin/nginx
    export PATH="/tmp/ngx/bin:$PATH"
fi

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

scaling() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
    local stack="FLUX_MODEL=$MODEL FLUX_COMPILE=${SCALING_COMPILE:-0} FLUX_WARMUP_SIZES=512x512"
    stack+=" FLUX_DRAIN_TIMEOUT=5 FLUX_LOG_DIR=$OUT/logs FLUX_RUN_DIR=/tmp/flux-run BASE_PORT=8100 NGINX_PORT=8180"
    ITEM_TIMEOUT="${SCALING_TIMEOUT:-560}" TAIL=40 item scaling "$PY" -m bench.http --url "$URL" \
        --start "$stack ./start_multi_gpu.sh start -m bf16" --stop "$stack ./start_multi_gpu.sh stop" \
        --gpus "${SCALING_GPUS:-1,2,4}" --concurrency 2 --requests "${SCALING_REQUESTS:-8}" --warmup -1 \
        --width 512 --height 512 --steps 28 --json "$OUT/scaling.json"
}

case "${1:-}" in
    single) single ;;
    scaling) scaling ;;
    *) sed -n '2,11p' "${BASH_SOURCE[0]}"; exit 2 ;;
esac
