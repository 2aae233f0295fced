#!/usr/bin/env bash
# The benchmark suite for one GPU machine, in one call: raw (in-process) and HTTP figures for the
# full-size synthetic FLUX models, a compact summary table at the end.
#
# Usage (from anywhere; it works in the repository root):  bench/gpu_suite.sh
#        SUITE=raw-bf16,http-bf16 bench/gpu_suite.sh        a subset
#        SUITE=http-scaling bench/gpu_suite.sh              1, 2, 4 workers (several GPUs)
#
# Items, in the order they run. Each builds a full-size model (~20-30 s) and warms it up, so pick subsets
# when time is short. fp8 runs last: its compile warm-up alone took 96 s on H100.
#   raw-bf16             bf16 eager, dummy:flux.1-dev: 1024²/28 batch 1, 512²/28 batch 1 and 4
#   raw-fp4              bitsandbytes fp4, 1024²/28; checks <= 9 GiB resident after load
#   raw-bf16-compile     bf16 + compile_repeated_blocks, 1024²/28
#   raw-schnell-compile  dummy:flux.1-schnell, bf16 + compile, 1024²/4
#   http-bf16            one bf16 worker behind nginx (start_multi_gpu.sh), 1024²/28, concurrency 1 and 2,
#                        e2e/raw against the raw row of the same settings; without nginx, curl or ps (or
#                        when start_multi_gpu.sh fails) one worker is benchmarked directly (http-bf16-direct)
#   raw-fp8-compile      torchao fp8 (row-wise) + compile, 1024²/28; skipped when float8 cannot run here
#   http-bf16-direct     not in the default set: http-bf16 against one worker without nginx (the proxy's cost)
#   http-scaling         not in the default set: 1, 2, 4... bf16 workers through nginx, scaling efficiency
#
# Environment:
#   SUITE              comma list of items (default: every item but http-scaling)
#   OUT                output folder (set by the device tool; default bench/results)
#   SUITE_BUDGET_S     wall-clock budget in seconds for the whole suite (default 540). An item is skipped
#                      when less than its minimum is left; a running item is stopped at the budget
#   REPEATS, WARMUPS   timed and warm-up calls per raw case (default 3 and 1)
#   PROFILE            1: one extra call per raw case timed phase by phase (default 1)
#   HTTP_REQUESTS      measured requests per HTTP level, per GPU (default 4)
#   HTTP_CONCURRENCY   closed-loop levels of http-bf16 (default 1,2); http-scaling uses 2 per GPU
#   HTTP_COMPILE       1: the HTTP workers compile (FLUX_COMPILE; their warm-up reuses the inductor cache of
#                      raw-bf16-compile) and are compared with that raw row; default 0, eager, vs raw-bf16
#   SCALING_GPUS       GPU counts of http-scaling (default 1,2,4,8 up to the GPUs present)
#   PYTHON             interpreter (default python3)
#   SUITE_DEVICE       cuda (default) or cpu; with SUITE_MODEL_DEV=dummy:tiny SUITE_MODEL_SCHNELL=dummy:tiny
#                      the whole script can be tried on a machine without a GPU
#
# Carried packages: a .whl/ folder is installed into /tmp/site (PYTHONPATH), a .deb/ folder (nginx) is
# unpacked into /tmp/ngx and its nginx put first on PATH (../shared/tools/device-wheels.sh makes both).
#
# Output under $OUT, at most three files, rewritten after every item so that a run cut short keeps what
# it measured: suite-<stamp>.json (every result, with card, versions and commands; `python -m bench.record`
# turns it into docs/BENCHMARKS.md sections), suite-<stamp>.log (everything printed) and
# suite-<stamp>.tar.gz (each item's JSON and log, the worker and nginx logs).
# Exit status: 0 when every item that ran succeeded, 1 otherwise. A failing item never stops the suite.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
        export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
if [ -d .deb ]; then
    mkdir -p /tmp/ngx && for f in .deb/*.deb; do dpkg -x "$f" /tmp/ngx; done
fi

DEFAULT_SUITE="raw-bf16,raw-fp4,raw-bf16-compile,raw-schnell-compile,http-bf16,raw-fp8-compile"
SUITE="${SUITE:-$DEFAULT_SUITE}"
OUT="${OUT:-bench/results}"
SUITE_BUDGET_S="${SUITE_BUDGET_S:-540}"
REPEATS="${REPEATS:-3}"
WARMUPS="${WARMUPS:-1}"
PROFILE="${PROFILE:-1}"
HTTP_REQUESTS="${HTTP_REQUESTS:-4}"
HTTP_CONCURRENCY="${HTTP_CONCURRENCY:-1,2}"
HTTP_COMPILE="${HTTP_COMPILE:-0}"
SCALING_GPUS="${SCALING_GPUS:-}"
PYTHON="${PYTHON:-python3}"

SUITE_DEVICE="${SUITE_DEVICE:-cuda}"
MODEL_DEV="${SUITE_MODEL_DEV:-dummy:flux.1-dev}"
MODEL_SCHNELL="${SUITE_MODEL_SCHNELL:-dummy:flux.1-schnell}"
BASE_PORT=8100
NGINX_PORT=8180
DIRECT_PORT=8190
RESERVE_S=15   # kept back from the budget for the summary and the archive
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
WORK="/tmp/bench-suite-$STAMP"
STATUS="$WORK/status.tsv"
SUITE_JSON="$OUT/suite-$STAMP.json"
SUITE_LOG="$OUT/suite-$STAMP.log"
ARCHIVE="$OUT/suite-$STAMP.tar.gz"
FAILED=0

info() { printf '[suite %4ss] %s\n' "$SECONDS" "$*"; }
banner() { printf '\n==================== %s ====================\n' "$*"; }
have() { command -v "$1" >/dev/null 2>&1; }
left() { echo $((SUITE_BUDGET_S - SECONDS)); }

# ---------------------------------------------------------------------------------------------
# Bookkeeping: one status line per item, the combined JSON and the archive after each
# ---------------------------------------------------------------------------------------------
record() {  # record ITEM STATUS SECONDS JSON|- MESSAGE
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5//$'\t'/ }" >>"$STATUS"
    [[ "$2" == failed ]] && FAILED=1
    summarize --quiet
    archive
}

summarize() {
    "$PYTHON" -m bench.suite --status "$STATUS" --out "$SUITE_JSON" \
        --command "SUITE=$SUITE SUITE_BUDGET_S=$SUITE_BUDGET_S REPEATS=$REPEATS WARMUPS=$WARMUPS bench/gpu_suite.sh" "$@"
}

archive() {
    tar -czf "$ARCHIVE.tmp" -C "$WORK" items logs 2>/dev/null && mv "$ARCHIVE.tmp" "$ARCHIVE"
    rm -f "$ARCHIVE.tmp"
}

# run_bench ITEM MIN_SECONDS COMMAND...: runs a bench program with --json for this item, stopped at the
# budget; records ok, failed (with whatever JSON it wrote) or skipped.
run_bench() {
    local item="$1" min_s="$2" remaining started rc json msg
    shift 2
    remaining="$(left)"
    if ((remaining - RESERVE_S < min_s)); then
        info "$item: skipped, needs about ${min_s}s and $((remaining - RESERVE_S))s are left (SUITE_BUDGET_S)"
        record "$item" skipped 0 - "budget: $((remaining - RESERVE_S))s left, needs about ${min_s}s"
        LAST_RC=skipped
        return
    fi
    banner "$item"
    json="$WORK/items/$item.json"
    info "$*"
    started=$SECONDS
    if have timeout; then
        timeout --kill-after=20 "$((remaining - RESERVE_S))" "$@" --json "$json" 2>&1 | tee "$WORK/items/$item.log"
    else
        "$@" --json "$json" 2>&1 | tee "$WORK/items/$item.log"
    fi
    rc="${PIPESTATUS[0]}"
    LAST_RC="$rc"
    [[ -f "$json" ]] || json=-
    case "$rc" in
        0) record "$item" ok "$((SECONDS - started))" "$json" ""; return ;;
        124 | 137) msg="stopped at the suite budget after $((SECONDS - started))s" ;;
        3) msg="the service did not start" ;;
        *) msg="exit status $rc" ;;
    esac
    info "$item: FAILED ($msg)"
    record "$item" failed "$((SECONDS - started))" "$json" "$msg"
}

# ---------------------------------------------------------------------------------------------
# Raw items
# ---------------------------------------------------------------------------------------------
raw() {  # raw ITEM MIN_SECONDS ARGS...
    local item="$1" min_s="$2" extra=()
    shift 2
    [[ "$PROFILE" == 1 ]] && extra+=(--profile)
    run_bench "$item" "$min_s" "$PYTHON" -m bench.raw --device "$SUITE_DEVICE" --repeats "$REPEATS" \
        --warmups "$WARMUPS" --compile-cache-dir "$WORK/inductor" "${extra[@]}" "$@"
}

item_raw_bf16() {
    raw raw-bf16 70 --model "$MODEL_DEV" --precision bf16 \
        --case 1024x1024:28:1 --case 512x512:28:1 --case 512x512:28:4
}
item_raw_fp4() { raw raw-fp4 50 --model "$MODEL_DEV" --precision fp4 --case 1024x1024:28:1 --max-resident-gib 9; }
item_raw_bf16_compile() { raw raw-bf16-compile 70 --model "$MODEL_DEV" --precision bf16 --compile --case 1024x1024:28:1; }
item_raw_schnell_compile() {
    raw raw-schnell-compile 55 --model "$MODEL_SCHNELL" --precision bf16 --compile --case 1024x1024:4:1
}
item_raw_fp8_compile() {
    local why
    if ! why="$("$PYTHON" -m bench.preflight --fp8 2>&1 | tail -n 1)"; then
        info "raw-fp8-compile: skipped, $why"
        record raw-fp8-compile skipped 0 - "$why"
        return
    fi
    raw raw-fp8-compile 140 --model "$MODEL_DEV" --precision fp8 --compile --case 1024x1024:28:1
}

# ---------------------------------------------------------------------------------------------
# HTTP items
# ---------------------------------------------------------------------------------------------
# nginx unpacked from a .deb: a wrapper passes -e, since the compiled-in error log path does not exist.
setup_nginx() {
    [[ -x /tmp/ngx/usr/sbin/nginx ]] || return 0
    mkdir -p /tmp/ngx/bin /tmp/ngx/logs
    cat >/tmp/ngx/bin/nginx <<'EOF'
#!/bin/sh
exec /tmp/ngx/usr/sbin/nginx -e /tmp/ngx/logs/error.log "$@"
EOF
    chmod +x /tmp/ngx/bin/nginx
    export PATH="/tmp/ngx/bin:$PATH"
    if have ldd && ldd /tmp/ngx/usr/sbin/nginx | grep -q 'not found'; then
        info "nginx from .deb lacks libraries: $(ldd /tmp/ngx/usr/sbin/nginx | grep 'not found' | tr -s ' \n' ' ')"
    fi
}

# True when start_multi_gpu.sh can run here; STACK_WHY says why not.
stack_usable() {
    local tool
    STACK_WHY=""
    [[ -x ./start_multi_gpu.sh ]] || { STACK_WHY="no start_multi_gpu.sh"; return 1; }
    for tool in curl ps nginx; do
        have "$tool" || { STACK_WHY="$tool is not installed"; return 1; }
    done
    nginx -v >/dev/null 2>&1 || { STACK_WHY="nginx does not run: $(nginx -v 2>&1 | head -n 1)"; return 1; }
}

# The environment of start_multi_gpu.sh for this suite, as one shell-quoted string.
stack_env() {
    local python_bin
    python_bin="$(command -v "$PYTHON")"
    printf '%q ' "FLUX_PYTHON=$python_bin" "FLUX_MODEL=$MODEL_DEV" "FLUX_DEVICE=$SUITE_DEVICE" \
        FLUX_WARMUP_SIZES=1024x1024 FLUX_WARMUP_STEPS=2 FLUX_MAX_CONCURRENT=2 \
        "BASE_PORT=$BASE_PORT" "NGINX_PORT=$NGINX_PORT" "FLUX_RUN_DIR=$WORK/run" "FLUX_LOG_DIR=$WORK/logs" \
        "NGINX_LOG_DIR=$WORK/logs/nginx" "FLUX_OUTPUT_DIR=$WORK/outputs" "FLUX_HEALTH_TIMEOUT=$(left)" \
        "FLUX_COMPILE=$HTTP_COMPILE" "FLUX_COMPILE_CACHE_DIR=$WORK/inductor" FLUX_DRAIN_TIMEOUT=5 \
        FLUX_STOP_TIMEOUT=15 "$@"
}

# Whatever happened to the bench program, no worker may keep a GPU busy for the next item.
stop_stack() {
    bash -c "$(stack_env) ./start_multi_gpu.sh stop" >>"$WORK/logs/stack.log" 2>&1 || true
}

stop_direct_worker() {
    local pid pidfile="$WORK/run/direct.pid" i
    pid="$(cat "$pidfile" 2>/dev/null)" || return 0
    rm -f "$pidfile"
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 0
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'main_bf16.py' || return 0
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < 60; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null || true
}

# The suite file holds every raw result so far; bench.http picks the row of the same size, steps,
# precision and compile setting as the worker.
http_baseline_args() {
    HTTP_BASELINE=()
    [[ -f "$SUITE_JSON" ]] && HTTP_BASELINE=(--raw-baseline "$SUITE_JSON")
}

item_http_bf16() {
    local common
    http_baseline_args
    common=(--width 1024 --height 1024 --steps 28 --concurrency "$HTTP_CONCURRENCY" --requests "$HTTP_REQUESTS"
        --warmup 1 --ready-timeout "$(left)" "${HTTP_BASELINE[@]}")
    if stack_usable; then
        run_bench http-bf16 100 "$PYTHON" -m bench.http --url "http://127.0.0.1:$NGINX_PORT" \
            --start "$(stack_env NUM_GPUS=1) ./start_multi_gpu.sh start -m bf16" \
            --stack-log "$WORK/logs/stack.log" "${common[@]}"
        stop_stack
        [[ "$LAST_RC" == 3 ]] || return
        info "http-bf16: start_multi_gpu.sh did not come up; benchmarking one worker without nginx"
    else
        info "http-bf16: start_multi_gpu.sh cannot run here ($STACK_WHY); benchmarking one worker without nginx"
    fi
    item_http_bf16_direct
}

# One worker started here, no nginx: the fallback of http-bf16, and with it the cost of the proxy.
item_http_bf16_direct() {
    local common direct_cmd python_bin
    http_baseline_args
    common=(--width 1024 --height 1024 --steps 28 --concurrency "$HTTP_CONCURRENCY" --requests "$HTTP_REQUESTS"
        --warmup 1 --ready-timeout "$(left)" "${HTTP_BASELINE[@]}")
    python_bin="$(command -v "$PYTHON")"
    direct_cmd="echo \$\$ >$(printf '%q' "$WORK/run/direct.pid"); exec env $(printf '%q ' \
        "FLUX_MODEL=$MODEL_DEV" "FLUX_DEVICE=$SUITE_DEVICE" FLUX_WARMUP_SIZES=1024x1024 FLUX_WARMUP_STEPS=2 \
        FLUX_MAX_CONCURRENT=2 "FLUX_PORT=$DIRECT_PORT" "BF16_API_PORT=$DIRECT_PORT" "FLUX_OUTPUT_DIR=$WORK/outputs" \
        "FLUX_COMPILE=$HTTP_COMPILE" "FLUX_COMPILE_CACHE_DIR=$WORK/inductor" FLUX_DRAIN_TIMEOUT=5 \
        FLUX_GPU_INDEX=0 "$python_bin") main_bf16.py >>$(printf '%q' "$WORK/logs/direct_worker.log") 2>&1"
    run_bench http-bf16-direct 100 "$PYTHON" -m bench.http --url "http://127.0.0.1:$DIRECT_PORT" \
        --start "$direct_cmd" --stop "" --stack-log "$WORK/logs/stack.log" "${common[@]}"
    stop_direct_worker
}

item_http_scaling() {
    local count list="$SCALING_GPUS" n
    count="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')"
    if [[ -z "$list" ]]; then
        for n in 1 2 4 8; do ((n <= count)) && list+="${list:+,}$n"; done
    fi
    if ! stack_usable; then
        info "http-scaling: skipped, $STACK_WHY"
        record http-scaling skipped 0 - "$STACK_WHY"
        return
    fi
    http_baseline_args
    run_bench http-scaling 150 "$PYTHON" -m bench.http --url "http://127.0.0.1:$NGINX_PORT" \
        --start "$(stack_env) ./start_multi_gpu.sh start -m bf16" --gpus "$list" --concurrency 2 \
        --requests "$HTTP_REQUESTS" --width 1024 --height 1024 --steps 28 --ready-timeout "$(left)" \
        --stack-log "$WORK/logs/stack.log" "${HTTP_BASELINE[@]}"
    stop_stack
}

# ---------------------------------------------------------------------------------------------
main() {
    local item
    mkdir -p "$WORK/items" "$WORK/logs" "$WORK/run" "$WORK/outputs" "$OUT"
    : >"$STATUS"
    info "suite $STAMP: items $SUITE; budget ${SUITE_BUDGET_S}s; output $OUT"
    if have nvidia-smi; then nvidia-smi; else info "nvidia-smi not found"; fi
    setup_nginx
    "$PYTHON" -m bench.preflight || info "preflight: a module the worker needs is missing (see above)"
    for item in ${SUITE//,/ }; do
        case "$item" in
            raw-bf16) item_raw_bf16 ;;
            raw-fp4) item_raw_fp4 ;;
            raw-bf16-compile) item_raw_bf16_compile ;;
            raw-schnell-compile) item_raw_schnell_compile ;;
            raw-fp8-compile) item_raw_fp8_compile ;;
            http-bf16) item_http_bf16 ;;
            http-bf16-direct) item_http_bf16_direct ;;
            http-scaling) item_http_scaling ;;
            *) info "unknown item '$item' (see the header of $0)"; record "$item" failed 0 - "unknown item" ;;
        esac
    done
    archive
    banner "summary"
    info "results: $SUITE_JSON, $SUITE_LOG, $ARCHIVE (scratch: $WORK)"
    summarize
    return "$FAILED"
}

if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
    sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi
mkdir -p "$OUT"
main 2>&1 | tee -a "$SUITE_LOG"
exit "${PIPESTATUS[0]}"
