#!/usr/bin/env bash
# Latency mode (one image on a GPU group) against one GPU, in one device call of a machine with 2+ GPUs.
#
#   bench/latency_runs.sh [CASE...]   each case starts the real service (start_multi_gpu.sh, nginx in front)
#                                     with bf16, compile on, dummy:flux.1-dev, warm-up 1024x1024 only,
#                                     FLUX_MAX_CONCURRENT=1, and times 1024²/28 at one client through nginx:
#       one        one worker on GPU 0 (the baseline)
#       ulysses    one worker over GPUs 0,1, FLUX_PARALLEL=ulysses
#       ring       one worker over GPUs 0,1, FLUX_PARALLEL=ring (cuDNN attention)
#       ulysses-overlap, ring-overlap   the same with FLUX_PARALLEL_OVERLAP=1
#   default: one ulysses ring. After each case the same seed's image is kept, and the images of the cases are
#   compared pixel by pixel at the end (same model, same seed: only bf16 rounding may differ).
#
# Environment: OUT (results, default bench/results), PYTHON (default python3), REQUESTS (timed, default 5),
# BENCH_MODEL and SIZE (default dummy:flux.1-dev, 1024; dummy:tiny and 256 with FLUX_DEVICE=cpu
# FLUX_PARALLEL_BACKEND=gloo try the script on a CPU, ring excepted),
# ITEM_TIMEOUT (seconds per step, default 240).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

OUT="${OUT:-bench/results}"
PY="${PYTHON:-python3}"
export FLUX_PYTHON="${FLUX_PYTHON:-$(command -v "$PY")}"
ITEM_TIMEOUT="${ITEM_TIMEOUT:-240}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
[[ -x /tmp/ngx/usr/sbin/nginx && ! -x /tmp/ngx/bin/nginx ]] && {
    mkdir -p /tmp/ngx/bin /tmp/ngx/logs
    printf '#!/bin/sh\nexec /tmp/ngx/usr/sbin/nginx -e /tmp/ngx/logs/error.log "$@"\n' >/tmp/ngx/bin/nginx
    chmod +x /tmp/ngx/bin/nginx
}
[[ -x /tmp/ngx/bin/nginx ]] && export PATH="/tmp/ngx/bin:$PATH"

URL=http://127.0.0.1:8180
MODEL="${BENCH_MODEL:-dummy:flux.1-dev}"   # BENCH_MODEL=dummy:tiny SIZE=256 FLUX_DEVICE=cpu tries it on a CPU
SIZE="${SIZE:-1024}"
STACK=(env BASE_PORT=8100 NGINX_PORT=8180 "FLUX_MODEL=$MODEL" FLUX_COMPILE=1 "FLUX_WARMUP_SIZES=${SIZE}x$SIZE"
       FLUX_MAX_CONCURRENT=1 FLUX_DRAIN_TIMEOUT=5 FLUX_HEALTH_TIMEOUT=300 FLUX_COMPILE_CACHE_DIR=/tmp/flux-inductor
       FLUX_LOG_DIR="$OUT/logs" FLUX_RUN_DIR=/tmp/flux-run ./start_multi_gpu.sh)

item() {  # item NAME COMMAND...: run with a deadline, keep its log, print its last lines
    local name="$1"; shift
    echo "=== $name ($(date -u +%T))"
    timeout "$ITEM_TIMEOUT" "$@" >"$OUT/$name.log" 2>&1
    echo "rc=$?"
    grep -v -i 'warn' "$OUT/$name.log" | tail -n "${TAIL:-8}"
}

run_case() {  # run_case NAME GPUS -g PARALLEL
    local name="$1" gpus="$2" g="$3" parallel="$4" started=$SECONDS
    item "$name-start" env NUM_GPUS="$gpus" FLUX_PARALLEL="$parallel" "${STACK[@]}" start -m bf16 -g "$g" </dev/null
    echo "ready after $((SECONDS - started)) s"
    item "$name-1024" "$PY" -m bench.http --url "$URL" --concurrency 1 --requests "${REQUESTS:-5}" --warmup 1 \
        --width "$SIZE" --height "$SIZE" --steps 28 --json "$OUT/$name.json"
    # one fixed-seed image for the comparison between cases
    curl -s -m 60 "$URL/generate" -H 'content-type: application/json' \
        -d "{\"prompt\":\"a lighthouse at dusk\",\"width\":$SIZE,\"height\":$SIZE,\"num_inference_steps\":28,\"seed\":7}" \
        >"/tmp/$name-seed7.json"
    "$PY" - "$name" <<'EOF'
import json, sys, urllib.request
name = sys.argv[1]
body = json.load(open(f"/tmp/{name}-seed7.json"))
print("seed 7:", {k: body.get(k) for k in ("generate_ms", "gpu", "error")})
url = body.get("image_url", "").replace("localhost", "127.0.0.1")
if url:
    urllib.request.urlretrieve(url.replace(url.split("/images/")[0], "http://127.0.0.1:8180"), f"/tmp/{name}-seed7.png")
EOF
    curl -s "http://127.0.0.1:8100/health" | head -c 400; echo
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader
    item "$name-stop" "${STACK[@]}" stop
}

compare() {
    "$PY" - "$@" <<'EOF'
import sys
import numpy as np
from PIL import Image
names = [n for n in sys.argv[1:]]
imgs = {}
for n in names:
    try:
        imgs[n] = np.asarray(Image.open(f"/tmp/{n}-seed7.png").convert("RGB"), dtype=np.float32)
    except Exception as exc:
        print(n, "no image:", exc)
base = names[0]
for n in names[1:]:
    if base in imgs and n in imgs:
        d = np.abs(imgs[base] - imgs[n])
        print(f"{n} vs {base}: mean |diff| {d.mean():.3f}, max {d.max():.0f} (of 255), "
              f"pixels within 8: {(d.max(axis=2) <= 8).mean() * 100:.1f}%")
EOF
}

cases=("$@")
((${#cases[@]})) || cases=(one ulysses ring)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
"$PY" -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "nccl", torch.cuda.nccl.version())'
for c in "${cases[@]}"; do
    case "$c" in
        one) run_case one 1 1 off ;;
        ulysses) run_case ulysses 2 2 ulysses ;;
        ring) run_case ring 2 2 ring ;;
        ulysses-overlap) FLUX_PARALLEL_OVERLAP=1 run_case ulysses-overlap 2 2 ulysses ;;
        ring-overlap) FLUX_PARALLEL_OVERLAP=1 run_case ring-overlap 2 2 ring ;;
        *) echo "unknown case $c" ;;
    esac
done
"$PY" - "$OUT" "${cases[@]}" <<'EOF'
import json, sys, pathlib
out, cases = pathlib.Path(sys.argv[1]), sys.argv[2:]
rows = {}
for c in cases:
    try:
        data = json.loads((out / f"{c}.json").read_text())
    except Exception as exc:
        print(c, "no result:", exc)
        continue
    for level in data.get("levels", []):
        print(c, {k: v for k, v in level.items() if not isinstance(v, (list, dict))})
EOF
compare "${cases[@]}"
