#!/usr/bin/env bash
# Start, stop and inspect one FLUX worker per GPU behind an nginx load balancer.
#
# Usage: ./start_multi_gpu.sh [start|stop|status|restart|prepare] [-m MODE] [-g GPUS] [-c NGINX_CONF] [--workers-only]
#        ./start_multi_gpu.sh gateway|status|stop|restart -f FLEET   a fleet of hosts behind this nginx
#        ./start_multi_gpu.sh nginx-conf       print the nginx config for the current settings
#        ./start_multi_gpu.sh worker N         run worker N in the foreground (systemd template unit)
#        ./start_multi_gpu.sh nginx            run nginx in the foreground (systemd unit)
#
#   start (default)  start a worker per GPU (or per -g group; worker i on port BASE_PORT+i), wait for /health, start
#                    nginx on NGINX_PORT, print a table and the URL; the services keep running
#   stop             drain (workers finish accepted work, nginx finishes open requests), then stop;
#                    safe to run when nothing runs
#   status           table of workers and nginx; exit 0 all ready, 1 some not ready, 3 not running
#   restart          stop, then start with the same -m/-c as last time unless given again
#   prepare          compile once for the fleet: load and warm up one worker per precision of MODE on GPU 0,
#                    in the foreground, filling FLUX_COMPILE_CACHE_DIR (plus a portable artifacts file), so
#                    that `start` then warms every worker up from the cache (docs/COLD_START.md)
#   -m MODE          fp4 (default) | bf16 | fp8 | mixed (first half of the GPUs fp4, the rest bf16)
#                    | one precision per GPU: fp4,fp4,bf16,bf16
#                    With more than one precision, /generate/fast goes to fp8 (or fp4) workers,
#                    /generate/quality to bf16 workers and /generate to all of them.
#   -g GPUS          GPUs per worker (default 1): one number for every worker, or a list per worker
#                    (2,2,1,1,1,1). A worker of several GPUs renders each image on all of them
#                    (latency mode, FLUX_PARALLEL, default ulysses); GPUs are handed out in order, one
#                    port per worker. -m then names one precision per worker.
#   -c FILE          use this nginx config as given instead of rendering one; nginx's port is FILE's
#                    `listen` port (NGINX_PORT, when set, must agree)
#   --workers-only   a GPU host of a fleet: workers only, bound to FLUX_HOST (this host's address as the
#                    fleet's inventory lists it), ids h<FLUX_HOST>_<port>, no nginx (FLUX_WORKERS_ONLY=1 too)
#   gateway -f FLEET nginx alone, as the entry point of every worker of every host listed in FLEET (one line
#                    per host: ADDRESS BASE_PORT NUM_WORKERS [MODES]); status/stop/restart -f FLEET show the
#                    fleet (per host, per worker, totals) and stop/reload the gateway. docs/OPERATIONS.md
#
# Environment (every setting can also be edited at the top of this file):
#   NUM_GPUS            GPUs to use (default: GPUs listed by nvidia-smi; 1 in CPU mode); one worker
#                       per GPU unless -g groups them
#   FLUX_GPUS_PER_WORKER  default for -g                                                (default 1)
#   FLUX_PARALLEL       ulysses | ring: how a worker of several GPUs splits an image  (default ulysses)
#   BASE_PORT           port of worker 0; worker i gets BASE_PORT+i                  (default 8000)
#   NGINX_PORT          port nginx listens on                                        (default 80)
#   NGINX_ADDR          address nginx listens on                              (default: all addresses)
#   FLUX_MODE           default for -m                                               (default fp4)
#   FLUX_DEVICE         auto | cuda | cpu. cpu, or no nvidia-smi, starts the CPU demo
#   FLUX_MODEL          model for every worker (CPU demo default: dummy:tiny)
#   FLUX_PYTHON         interpreter for the workers (default: active venv, else .venv, created
#                       with requirements.txt on first run)
#   FLUX_HEALTH_TIMEOUT seconds to wait for every worker's /health                   (default 900)
#   FLUX_DRAIN_TIMEOUT  seconds a worker may spend finishing accepted work on stop  (default 30)
#   FLUX_STOP_TIMEOUT   seconds `stop` waits before SIGKILL       (default FLUX_DRAIN_TIMEOUT + 15)
#   FLUX_HOST           address the workers bind                                     (default 127.0.0.1)
#   FLUX_OUTPUT_DIR     shared image folder, served by nginx at /images/      (default ./outputs)
#   FLUX_LOG_DIR        worker logs: flux_gpu{i}_port{port}.log          (default ./logs/multi_gpu)
#   FLUX_RUN_DIR        pid files, run state, nginx prefix and config             (default ./run)
#   NGINX_LOG_DIR       nginx access.log (JSON lines) and error.log     (default ./logs/multi_gpu/nginx)
#   NGINX_USER          account of nginx's workers when started as root (default: owner of
#                       FLUX_OUTPUT_DIR, else nobody); never root
#   FLUX_RATE_LIMIT     per-API-key rate limit in nginx, e.g. 10r/s; 429 beyond it  (default off)
#   FLUX_RATE_BURST     burst above the rate before 429                               (default 20)
#   NGINX_MAX_BODY      largest request body                                          (default 1m)
#   NGINX_READ_TIMEOUT  longest wait for a worker's answer                          (default 600s)
#   NGINX_MAX_FAILS     gateway: failed attempts that take a worker out of rotation   (default 3)
#   NGINX_FAIL_TIMEOUT  gateway: ... within this time, and for this long before a retry (default 30s)
#   NGINX_LORA_AFFINITY on: requests with LoRA adapters go to the worker of their first adapter (default on)
#   Every other FLUX_* variable (FLUX_MAX_CONCURRENT, FLUX_MAX_QUEUE_SIZE, FLUX_API_KEYS, ...) is
#   passed to the workers unchanged.
set -euo pipefail

NUM_GPUS="${NUM_GPUS:-}"          # empty: every GPU nvidia-smi lists (1 in CPU mode)
BASE_PORT="${BASE_PORT:-8000}"
NGINX_PORT_GIVEN="${NGINX_PORT:+1}"  # set in the environment: a -c file's port must agree with it
NGINX_PORT="${NGINX_PORT:-80}"

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/scripts/lib.sh"
# shellcheck source=scripts/fleet.sh
source "$(dirname "${BASH_SOURCE[0]}")/scripts/fleet.sh"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------
resolve_settings() {
    load_paths
    [[ "$BASE_PORT" =~ ^[0-9]+$ ]] || fatal "BASE_PORT must be a number, got '$BASE_PORT'"
    [[ "$NGINX_PORT" =~ ^[0-9]+$ ]] || fatal "NGINX_PORT must be a number, got '$NGINX_PORT'"
    if cpu_mode; then CPU_MODE=1; else CPU_MODE=0; fi
    [[ -n "$NUM_GPUS" ]] || NUM_GPUS="$(detect_gpu_count)"
    [[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]] || fatal "NUM_GPUS must be a positive number, got '$NUM_GPUS'"
    expand_gpu_groups "$GPU_SPEC" "$NUM_GPUS"
    MODES="$(expand_modes "$MODE_SPEC" "$NUM_WORKERS")"
}

# -g: GPUs per worker, one number or a per-worker list. Sets GPU_GROUPS (each worker's CUDA_VISIBLE_DEVICES,
# GPUs handed out in order) and NUM_WORKERS.
expand_gpu_groups() {
    local spec="$1" total="$2" n g next=0 ids
    local -a sizes=()
    GPU_GROUPS=()
    if [[ "$spec" =~ ^[1-9][0-9]*$ ]]; then
        ((total % spec == 0)) ||
            fatal "-g $spec: $total GPU(s) do not split into workers of $spec (set NUM_GPUS, or list each worker: -g 2,1)"
        for ((n = 0; n < total / spec; n++)); do sizes+=("$spec"); done
    elif [[ "$spec" =~ ^[1-9][0-9]*(,[1-9][0-9]*)+$ ]]; then
        IFS=, read -r -a sizes <<<"$spec"
    else
        fatal "-g must be the GPUs per worker (2) or one count per worker (2,2,1,1), got '$spec'"
    fi
    for n in "${sizes[@]}"; do
        ids=""
        for ((g = next; g < next + n; g++)); do ids+="${ids:+,}$g"; done
        next=$((next + n))
        GPU_GROUPS+=("$ids")
        if ((n > 1)) && [[ "${FLUX_PARALLEL:-ulysses}" == off ]]; then
            fatal "-g $spec gives a worker $n GPUs, but FLUX_PARALLEL=off: use ulysses or ring"
        fi
    done
    ((next <= total)) || fatal "-g $spec needs $next GPUs, but NUM_GPUS is $total"
    ((next == total)) || warn "-g $spec uses $next of $total GPUs"
    NUM_WORKERS=${#GPU_GROUPS[@]}
}

# A worker of several GPUs (-g) renders through NCCL on CUDA GPUs: on a machine without them (the CPU demo) it
# would load and then fail; refuse it before anything starts. FLUX_PARALLEL_BACKEND=gloo (CPU groups, for
# tests) is let through.
check_groups_fit_device() {
    local group
    [[ "$CPU_MODE" == 1 && "${FLUX_PARALLEL_BACKEND:-auto}" != gloo ]] || return 0
    for group in "${GPU_GROUPS[@]}"; do
        [[ "$group" != *,* ]] ||
            fatal "-g $GPU_SPEC gives a worker GPUs $group, but this machine runs the CPU demo (no nvidia-smi, or FLUX_DEVICE=cpu): a worker of several GPUs needs CUDA GPUs; use -g 1 here"
    done
}

# The interpreter for the workers: FLUX_PYTHON, the active virtualenv/conda env, ./.venv, or a
# fresh ./.venv with requirements.txt so the first start on a new machine is one command.
resolve_python() {
    if [[ -n "${FLUX_PYTHON:-}" ]]; then
        PYTHON="$FLUX_PYTHON"
    elif [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
        PYTHON="$VIRTUAL_ENV/bin/python"
    elif [[ -n "${CONDA_PREFIX:-}" && -x "$CONDA_PREFIX/bin/python" ]]; then
        PYTHON="$CONDA_PREFIX/bin/python"
    elif [[ -x "$FLUX_PROJECT_DIR/.venv/bin/python" ]]; then
        PYTHON="$FLUX_PROJECT_DIR/.venv/bin/python"
    else
        have python3 || fatal "python3 not found: install Python 3.10+ (apt-get install python3 python3-venv)"
        [[ -f "$FLUX_PROJECT_DIR/requirements.txt" ]] || fatal "no requirements.txt in $FLUX_PROJECT_DIR"
        info "First run: creating .venv and installing requirements.txt (several minutes; log: $LOG_DIR/setup.log)"
        mkdir -p "$LOG_DIR"
        if ! "$FLUX_PROJECT_DIR/scripts/setup_venv.sh" "$FLUX_PROJECT_DIR/requirements.txt" \
            >>"$LOG_DIR/setup.log" 2>&1; then
            tail -n 20 "$LOG_DIR/setup.log" >&2
            rm -rf "$FLUX_PROJECT_DIR/.venv"
            fatal "setting up .venv failed; full log: $LOG_DIR/setup.log"
        fi
        PYTHON="$FLUX_PROJECT_DIR/.venv/bin/python"
    fi
    [[ -x "$PYTHON" ]] || PYTHON="$(command -v "$PYTHON" 2>/dev/null)" || fatal "interpreter '$FLUX_PYTHON' not found"
}

# The environment of worker i, as NAME=value words for env(1).
worker_env() {
    local i="$1" prec="$2" port threads group="${GPU_GROUPS[$1]:-$1}" size
    port="$(worker_port "$i")"
    size=$(($(tr -cd , <<<"$group" | wc -c) + 1))
    WORKER_ENV=(
        "FLUX_GPU_INDEX=${group%%,*}" "FLUX_GPUS_PER_WORKER=$size" "FLUX_WORKER_ID=$(worker_id_for "$port")" "FLUX_PORT=$port" "$(port_env_name "$prec")=$port"
        "FLUX_OUTPUT_DIR=$OUTPUT_DIR" "FLUX_HOST=${FLUX_HOST:-127.0.0.1}" "PYTHONUNBUFFERED=1"
    )
    # a worker of one GPU never joins a group, also when FLUX_PARALLEL is set for the others
    if ((size > 1)); then WORKER_ENV+=("FLUX_PARALLEL=${FLUX_PARALLEL:-ulysses}"); else WORKER_ENV+=("FLUX_PARALLEL=off"); fi
    if [[ "$CPU_MODE" == 1 ]]; then
        # Share the cores instead of every worker starting one thread per core.
        threads=$(($(nproc 2>/dev/null || echo 2) / NUM_GPUS))
        ((threads >= 1)) || threads=1
        WORKER_ENV+=("FLUX_DEVICE=cpu" "CUDA_VISIBLE_DEVICES=" "FLUX_MODEL=${FLUX_MODEL:-dummy:tiny}"
            "OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}")
    else
        WORKER_ENV+=("CUDA_VISIBLE_DEVICES=$group")
    fi
}

# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------
running_pids() {
    local f pid
    for f in "$RUN_DIR"/worker_gpu*.pid; do
        [[ -e "$f" ]] || continue
        pid="$(live_pid "$f" "$FLUX_PROJECT_DIR/main_")" && echo "$pid"
    done
    pid="$(live_pid "$(nginx_pidfile)" "$(nginx_marker)")" && echo "$pid"
    return 0
}

launch_worker() {
    local i="$1" prec="$2" script log launcher=()
    script="$(worker_script "$prec")"
    log="$(worker_log "$i")"
    worker_env "$i" "$prec"
    have setsid && launcher=(setsid)   # own process group: stop reaches its children too
    printf '\n=== %s start GPU %s %s port %s ===\n' "$(date '+%F %T')" "$i" "$prec" "$(worker_port "$i")" >>"$log"
    (cd "$FLUX_PROJECT_DIR" && exec "${launcher[@]}" env "${WORKER_ENV[@]}" "$PYTHON" "$script") \
        >>"$log" 2>&1 </dev/null &
    echo $! >"$(worker_pidfile "$i")"
    write_record "$(worker_record "$i")" "PID=$!" "GPU=$i" "PORT=$(worker_port "$i")" "PRECISION=$prec" \
        "STARTED_AT=$(date +%s)" "LOG=$log"
}

show_log_tail() {
    local log="$1"
    [[ -f "$log" ]] || return 0
    error "last lines of $log:"
    tail -n "${2:-25}" "$log" | sed 's/^/    /' >&2
}

# Waits until every worker answers /health 200; prints which GPU is still loading and for how long.
wait_for_workers() {
    local timeout="${FLUX_HEALTH_TIMEOUT:-900}" start=$SECONDS next_report=$((SECONDS + 5))
    local -a modes pending still took=()
    read -r -a modes <<<"$MODES"
    local i pid state line
    pending=()
    for ((i = 0; i < NUM_WORKERS; i++)); do pending+=("$i"); done
    while ((${#pending[@]} > 0)); do
        still=()
        line=""
        for i in "${pending[@]}"; do
            if ! pid="$(live_pid "$(worker_pidfile "$i")" "$FLUX_PROJECT_DIR/main_")"; then
                error "GPU $i worker (port $(worker_port "$i")) exited during startup"
                show_log_tail "$(worker_log "$i")"
                return 1
            fi
            # one /health answer gives both the state and the progress shown for it
            http_get "http://$(probe_host):$(worker_port "$i")/health" 2
            state="$(health_state)"
            case "$state" in
                ready) info "GPU $i ready on port $(worker_port "$i") after $((SECONDS - start))s"
                    took+=("GPU$i $((SECONDS - start))s") ;;
                failed)
                    error "GPU $i worker (port $(worker_port "$i")) failed to load the model"
                    show_log_tail "$(worker_log "$i")"
                    return 1 ;;
                loading) still+=("$i"); line+=" GPU$i:$(worker_progress "$((SECONDS - start))")" ;;
                # alive (checked above) but not answering yet: Python and torch still importing
                down) still+=("$i"); line+=" GPU$i:starting ($((SECONDS - start))s)" ;;
                *) still+=("$i"); line+=" GPU$i:$state" ;;
            esac
        done
        pending=("${still[@]+"${still[@]}"}")
        ((${#pending[@]} == 0)) && break
        if ((SECONDS - start >= timeout)); then
            error "workers not ready after ${timeout}s (FLUX_HEALTH_TIMEOUT):$line"
            for i in "${pending[@]}"; do show_log_tail "$(worker_log "$i")" 10; done
            return 1
        fi
        if ((SECONDS >= next_report)); then
            info "waiting $((SECONDS - start))s/${timeout}s:$line"
            next_report=$((SECONDS + 5))
        fi
        sleep 1
    done
    info "ready after: ${took[*]}"
}

# One worker's start-up progress from the /health body http_get last fetched, e.g.
# "warmup 1024x1024 1/3 (41s, last start 31s)" or "loading (12s)"; $1: seconds waited so far, shown when
# the body says no more (a worker that has not reported a phase yet).
worker_progress() {
    local phase item done_n total item_s expected elapsed
    { read -r phase; read -r item; read -r done_n; read -r total; read -r item_s; read -r expected; read -r elapsed; } < <(
        json_get "$HTTP_BODY" progress.phase progress.item progress.done progress.total progress.item_elapsed_s \
            progress.expected_s progress.elapsed_s)
    [[ -n "$phase" ]] || { echo "loading ($1s)"; return; }
    [[ "$item_s" =~ ^[0-9] ]] || item_s=0
    [[ "$elapsed" =~ ^[0-9] ]] || elapsed="$1"
    case "$phase" in
        warmup) printf 'warmup %s %s/%s (%ss%s)' "${item// /_}" "$((${done_n:-0} + 1))" "$total" "${item_s%.*}" \
            "$([[ -n "$expected" && "$expected" != null ]] && echo ", last start ${expected%.*}s")" ;;
        waiting) printf 'waiting for another worker'"'"'s compile (%ss)' "${item_s%.*}" ;;
        *) printf '%s (%ss)' "$phase" "${elapsed%.*}" ;;
    esac
}

# ---------------------------------------------------------------------------------------------
# Nginx
# ---------------------------------------------------------------------------------------------
# The renderer's --worker arguments for the workers this run starts (id = port, as the workers use).
worker_args() {
    local -a modes
    local i
    local host port
    if [[ -n "$FLEET_FILE" ]]; then fleet_worker_args; return; fi
    read -r -a modes <<<"$MODES"
    host="$(probe_host)"
    for ((i = 0; i < NUM_WORKERS; i++)); do
        port="$(worker_port "$i")"
        if [[ "$host" == 127.0.0.1 ]]; then
            printf -- '--worker\n%s:%s\n' "$port" "${modes[$i]}"
        else  # workers bound to another address, with the ids they were given there
            printf -- '--worker\n%s:%s:%s:%s\n' "$host" "$port" "${modes[$i]}" "$(worker_id_for "$port")"
        fi
    done
}

nginx_listen() { if [[ -n "${NGINX_ADDR:-}" ]]; then echo "$NGINX_ADDR:$NGINX_PORT"; else echo "$NGINX_PORT"; fi; }

# The common rendering options from the environment (rate limit, body size, read timeout).
render_options() {
    printf '%s\n' --listen "$(nginx_listen)" --max-body "${NGINX_MAX_BODY:-1m}" \
        --read-timeout "${NGINX_READ_TIMEOUT:-600s}" --burst "${FLUX_RATE_BURST:-20}" \
        --lora-affinity "${NGINX_LORA_AFFINITY:-on}"
    [[ -z "${FLUX_RATE_LIMIT:-}" ]] || printf '%s\n' --rate "$FLUX_RATE_LIMIT"
}

# The account nginx's workers run as when started as root: never root itself. NGINX_USER overrides;
# else the owner of the output folder, else nobody (with Debian's nogroup where it exists).
nginx_user() {
    local owner
    if [[ -n "${NGINX_USER:-}" ]]; then echo "$NGINX_USER"; return; fi
    owner="$(stat -c %U "$OUTPUT_DIR" 2>/dev/null || true)"
    if [[ -n "$owner" && "$owner" != root && "$owner" != UNKNOWN ]]; then echo "$owner"; return; fi
    if getent group nogroup >/dev/null 2>&1; then echo "nobody nogroup"; else echo nobody; fi
}

# True when the account can read files in dir (it must reach the folder through every parent).
user_can_read_dir() {
    local account="$1" dir="$2"
    have runuser || return 0
    runuser -u "$account" -- test -r "$dir" -a -x "$dir" 2>/dev/null
}

# Where nginx's unprivileged workers buffer large request bodies and upstream answers: a folder they own. Under
# the prefix when they can reach it; else (a prefix inside a 0700 home) a folder of their own under /tmp.
nginx_temp_dir() {
    local account="$1" dir="$NGINX_PREFIX/tmp"
    user_can_read_dir "${account%% *}" "$NGINX_PREFIX" || dir="/tmp/flux-nginx-$(id -u "${account%% *}")-$NGINX_PORT"
    if ! { mkdir -p "$dir" && chown "${account// /:}" "$dir" && chmod 700 "$dir"; }; then
        warn "cannot prepare $dir for nginx"
    fi
    echo "$dir"
}

# Writes the config nginx will run with (and workers.json next to it) and sets NGINX_CONF_USED and
# NGINX_G (the -g directives). A rendered config that holds API keys (rate-limit map) is mode 0600.
prepare_nginx_conf() {
    local -a args
    local account="" images="$OUTPUT_DIR"
    mkdir -p "$NGINX_PREFIX" "$NGINX_LOG_DIR" "$OUTPUT_DIR"
    mapfile -t args < <(worker_args; render_options)
    args+=(--web-dir "$FLUX_PROJECT_DIR/web" --headers-more auto --marker "$(nginx_marker_token)")
    if [[ $EUID -eq 0 ]]; then
        account="$(nginx_user)"
        args+=(--user "$account")
        if ! user_can_read_dir "${account%% *}" "$OUTPUT_DIR"; then
            warn "nginx runs as ${account%% *}, which cannot read $OUTPUT_DIR: the workers serve /images/ instead"
            images=""
        fi
        args+=(--temp-dir "$(nginx_temp_dir "$account")")
    fi
    [[ -z "$FLEET_FILE" ]] || images=""   # a gateway asks each image of its owner (or S3)
    [[ -z "$images" ]] || args+=(--images-dir "$images")
    if [[ -n "$CUSTOM_CONF" ]]; then
        NGINX_CONF_USED="$CUSTOM_CONF"
        # the dashboard's list of workers, for a custom config that serves it
        render_nginx "${args[@]}" --out "$NGINX_PREFIX/.unused.conf" --workers-json-out "$NGINX_PREFIX/workers.json" ||
            return 1
        rm -f "$NGINX_PREFIX/.unused.conf"
        # the shipped configs serve /ui/ and /dashboard/ from web/ under nginx's prefix (a copy: they refuse symlinks)
        if ! { rm -rf "$NGINX_PREFIX/web" && cp -R "$FLUX_PROJECT_DIR/web" "$NGINX_PREFIX/web"; }; then
            warn "cannot copy the web pages to $NGINX_PREFIX/web: /ui/ and /dashboard/ of a shipped config will answer 404"
        elif [[ -n "$account" ]] && ! user_can_read_dir "${account%% *}" "$NGINX_PREFIX/web"; then
            warn "nginx runs as ${account%% *}, which cannot reach $NGINX_PREFIX/web: /ui/ and /dashboard/ of a shipped config will answer 403 (set FLUX_RUN_DIR to a folder it can read)"
        fi
    else
        NGINX_CONF_USED="$NGINX_PREFIX/nginx.conf"
        render_nginx "${args[@]}" --out "$NGINX_CONF_USED" --workers-json-out "$NGINX_PREFIX/workers.json" || return 1
    fi
    if grep -Eq '^[[:space:]]*daemon[[:space:]]' "$NGINX_CONF_USED"; then
        error "$NGINX_CONF_USED sets 'daemon'; remove it: this script runs nginx in the foreground itself"
        return 1
    fi
    NGINX_G="daemon off;"
    grep -Eq '^[[:space:]]*pid[[:space:]]' "$NGINX_CONF_USED" || NGINX_G+=" pid $NGINX_PREFIX/nginx.pid;"
}

nginx_install_hint() {
    if have apt-get; then echo "sudo apt-get install nginx libnginx-mod-http-headers-more-filter"
    elif have dnf; then echo "sudo dnf install nginx"
    elif have brew; then echo "brew install nginx"
    else echo "install nginx from your package manager"; fi
}

# Root, CAP_NET_BIND_SERVICE (systemd AmbientCapabilities) or a port above the privileged range.
can_bind_port() {
    local floor=1024 caps
    [[ $EUID -eq 0 ]] && return 0
    [[ -r /proc/sys/net/ipv4/ip_unprivileged_port_start ]] && floor="$(cat /proc/sys/net/ipv4/ip_unprivileged_port_start)"
    [[ "$1" -ge "$floor" ]] && return 0
    caps="$(awk '/^CapEff:/ { print $2 }' /proc/$$/status 2>/dev/null)"
    [[ -n "$caps" ]] && (((16#$caps >> 10) & 1))
}

start_nginx() {
    local holder pid i
    if ! have nginx; then
        warn "nginx is not installed ($(nginx_install_hint)); falling back to direct access to the workers"
        return 1
    fi
    if ! can_bind_port "$NGINX_PORT"; then
        warn "cannot bind port $NGINX_PORT without root: run as root, or pick a high port: NGINX_PORT=8080 $0"
        warn "falling back to direct access to the workers"
        return 1
    fi
    holder="$(port_holder "$NGINX_PORT")"
    if [[ -n "$holder" ]]; then
        warn "nginx port $NGINX_PORT is already in use by $holder (a system nginx? 'sudo systemctl stop nginx', or NGINX_PORT=8080 $0)"
        warn "falling back to direct access to the workers"
        return 1
    fi
    prepare_nginx_conf || return 2   # a setting the renderer refused (it said which): an error, not a fallback
    [[ -n "$CUSTOM_CONF" ]] || grep -q '^load_module .*headers_more' "$NGINX_CONF_USED" ||
        warn "nginx's headers-more module is missing, so responses carry 'Server: nginx' (sudo apt-get install libnginx-mod-http-headers-more-filter)"
    if ! nginx -t -q -p "$NGINX_PREFIX/" -c "$NGINX_CONF_USED" -g "$NGINX_G" >"$NGINX_PREFIX/test.log" 2>&1; then
        error "nginx -t rejected $NGINX_CONF_USED:"
        sed 's/^/    /' "$NGINX_PREFIX/test.log" >&2
        return 2
    fi
    local launcher=() errors
    have setsid && launcher=(setsid)
    errors="$(escaped_log_fifo "$NGINX_LOG_DIR/error.log")" || { error "cannot make $NGINX_PREFIX/error-log.fifo"; return 2; }
    "${launcher[@]}" nginx -p "$NGINX_PREFIX/" -c "$NGINX_CONF_USED" -g "$NGINX_G" \
        >>"$NGINX_LOG_DIR/access.log" 2>"$errors" </dev/null &
    pid=$!
    echo "$pid" >"$(nginx_pidfile)"
    write_record "$(nginx_record)" "PID=$pid" "PORT=$NGINX_PORT" "CONF=$NGINX_CONF_USED" "STARTED_AT=$(date +%s)"
    for ((i = 0; i < 50; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then break; fi
        holder="$(port_holder "$NGINX_PORT")"
        [[ "$holder" == */nginx* ]] && { info "nginx (pid $pid) listening on port $NGINX_PORT"; return 0; }
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        # ours, started a moment ago, yet not on the port we expected: never leave it half-started
        error "nginx (pid $pid) runs but does not listen on port $NGINX_PORT after 5 s; stopping it"
        signal_tree QUIT "$pid"
    else
        error "nginx did not start"
    fi
    sleep 0.3  # the last lines pass through the error log's escaping filter
    show_log_tail "$NGINX_LOG_DIR/error.log" 10
    rm -f "$(nginx_pidfile)" "$(nginx_record)"
    return 2
}

# ---------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------
# One line per worker record: what runs, with the precision the worker reports it serves (GET /), which can
# differ from the one asked for (e.g. fp8 falling back on a GPU without fp8 support).
print_table() {
    local -a fields
    local f i port pid state model prec want all_ready=0
    printf '%-5s %-6s %-8s %-16s %-28s %s\n' GPU PORT PID PREC MODEL STATE
    while IFS= read -r f; do
        i="$(record_get "$f" GPU)"
        port="$(record_get "$f" PORT)"
        want="$(record_get "$f" PRECISION)"
        [[ "$i" =~ ^[0-9]+$ && "$port" =~ ^[0-9]+$ ]] || continue
        pid="$(live_pid "$(worker_pidfile "$i")" "$FLUX_PROJECT_DIR/main_")" || pid="-"
        state="$(worker_state "$port")"
        http_get "http://$(probe_host):$port/" 2
        mapfile -t fields < <(json_get "$HTTP_BODY" model precision requested_precision)
        model="${fields[0]:-}"
        prec="${fields[1]:-}"
        [[ -n "${fields[2]:-}" ]] && want="${fields[2]}"
        if [[ -z "$prec" ]]; then prec="${want:-?}?"
        elif [[ -n "$want" && "$want" != "$prec" ]]; then prec="$prec (asked $want)"; fi
        [[ "$state" == ready ]] || all_ready=1
        printf '%-5s %-6s %-8s %-16s %-28s %s\n' "$i" "$port" "$pid" "$prec" "${model:--}" "$state"
    done < <(worker_records)
    return "$all_ready"
}

print_endpoint() {
    local host="${NGINX_ADDR:-localhost}" url i
    [[ "$host" == 0.0.0.0 ]] && host=localhost
    if live_pid "$(nginx_pidfile)" "$(nginx_marker)" >/dev/null; then
        url="http://$host"
        [[ "$NGINX_PORT" == 80 ]] || url+=":$NGINX_PORT"
        banner "API endpoint: $url/generate   (nginx, least_conn over $NUM_WORKERS workers)"
        if [[ " $MODES " == *" bf16 "* && ( " $MODES " == *" fp4 "* || " $MODES " == *" fp8 "* ) ]]; then
            info "mixed precision: $url/generate/fast and $url/generate/quality"
        fi
        info "nginx logs: $NGINX_LOG_DIR/access.log (JSON), $NGINX_LOG_DIR/error.log"
    else
        banner "Direct access (no nginx): one URL per worker"
        for ((i = 0; i < NUM_WORKERS; i++)); do echo "  http://127.0.0.1:$(worker_port "$i")/generate"; done
    fi
    info "worker logs: $LOG_DIR/   monitor: ./monitor_multi_gpu.sh   stop: ./start_multi_gpu.sh stop"
}

cmd_start() {
    local -a modes
    local i port holder pids prec
    resolve_settings
    check_groups_fit_device
    mkdir -p "$RUN_DIR" "$LOG_DIR" "$OUTPUT_DIR"
    pids="$(running_pids)"
    if [[ -n "$pids" ]]; then
        fatal "already running (pids: $(echo "$pids" | tr '\n' ' ')); use '$0 status', '$0 stop' or '$0 restart'"
    fi
    read -r -a modes <<<"$MODES"
    for prec in "${modes[@]}"; do
        [[ -f "$(worker_script "$prec")" ]] || fatal "$(worker_script "$prec") not found"
    done
    for ((i = 0; i < NUM_WORKERS; i++)); do
        port="$(worker_port "$i")"
        holder="$(port_holder "$port")"
        [[ -z "$holder" ]] || fatal "port $port (GPU $i) is already in use by $holder; stop it, or choose another BASE_PORT"
    done
    [[ -z "$CUSTOM_CONF" || -f "$CUSTOM_CONF" ]] || fatal "nginx config $CUSTOM_CONF not found"
    [[ -z "$CUSTOM_CONF" ]] || custom_conf_port
    [[ "$WORKERS_ONLY" == 0 ]] || check_workers_only
    resolve_python
    [[ -n "$CUSTOM_CONF" || "$WORKERS_ONLY" == 1 ]] || warn_edited_shipped_confs

    if [[ "$CPU_MODE" == 1 ]]; then
        banner "*** CPU DEMO: no GPU in use (FLUX_DEVICE=${FLUX_DEVICE:-auto}, nvidia-smi $(have nvidia-smi && echo found || echo missing)) ***"
        banner "*** $NUM_WORKERS CPU worker(s) with FLUX_MODEL=${FLUX_MODEL:-dummy:tiny}: synthetic weights, not real images ***"
    fi
    info "starting $NUM_WORKERS worker(s) on ports $BASE_PORT-$((BASE_PORT + NUM_WORKERS - 1)) (precision: $MODES; GPUs: ${GPU_GROUPS[*]}; python: $PYTHON)"
    NGINX_CONF="$CUSTOM_CONF"
    rm -f "$RUN_DIR"/worker_gpu*.state "$(nginx_record)"   # nothing runs: records of an earlier run
    write_state
    state_set GPU_SPEC "$GPU_SPEC"
    state_set NUM_WORKERS "$NUM_WORKERS"   # what monitor_multi_gpu.sh watches (NUM_GPUS counts GPUs)
    state_set HOST "${FLUX_HOST:-127.0.0.1}"
    state_set WORKERS_ONLY "$WORKERS_ONLY"
    # Ctrl-C or a TERM while workers load: stop them too, rather than leave them loading with nobody watching.
    trap 'abort_start "interrupted (SIGINT)" 130' INT
    trap 'abort_start "terminated (SIGTERM)" 143' TERM
    for ((i = 0; i < NUM_WORKERS; i++)); do launch_worker "$i" "${modes[$i]}"; done

    if ! wait_for_workers; then
        abort_start "start failed" 1
    fi
    local rc=0
    if [[ "$WORKERS_ONLY" == 1 ]]; then
        state_set NGINX none
        trap - INT TERM
        echo
        print_table || true
        echo
        print_inventory_line
        return 0
    fi
    start_nginx || rc=$?
    case "$rc" in
        0) state_set NGINX up ;;
        1) state_set NGINX none ;;
        *) abort_start "nginx failed to start" 1 ;;
    esac
    trap - INT TERM
    echo
    print_table || true
    echo
    print_endpoint
}

# The guide's "edit nginx.conf": `start` renders its own config for the workers it starts, so an edit of a
# shipped file (nginx.conf: 8 fp4 workers, nginx_mixed.conf: 4 fp4 + 4 bf16) is not used unless the file is
# given with -c. Says so when a shipped file is no longer what the renderer makes for it.
warn_edited_shipped_confs() {
    local conf py
    py="$(renderer_python 2>/dev/null)" || return 0
    while IFS= read -r conf; do
        [[ -f "$FLUX_PROJECT_DIR/$conf" ]] || continue
        warn "$conf was edited, but start renders its own nginx config for the workers it starts (NUM_GPUS, BASE_PORT, -m): to run your edit, start with -c $conf"
    done < <("$py" "$RENDERER" shipped "$FLUX_PROJECT_DIR" 2>/dev/null)
}

# --workers-only: the workers are reached from the gateway at FLUX_HOST, and their ids name it.
check_workers_only() {
    [[ -z "$CUSTOM_CONF" ]] || fatal "--workers-only starts no nginx: -c does not apply"
    case "${FLUX_HOST:-}" in
        "" | 0.0.0.0 | :: | "[::]")
            fatal "--workers-only: set FLUX_HOST to this host's address as the fleet's inventory lists it (e.g. its private address, FLUX_HOST=10.0.0.5): the gateway reaches the workers there and their job ids name it" ;;
    esac
}

print_inventory_line() {
    local -a modes
    local spec
    read -r -a modes <<<"$MODES"
    spec="$(tr ' ' ',' <<<"$MODES")"
    [[ -n "$(tr ' ' '\n' <<<"$MODES" | sort -u | sed -n 2p)" ]] || spec="${modes[0]}"
    banner "Workers only (no nginx on this host): ids h<address>_<port>, e.g. $(worker_id_for "$BASE_PORT")"
    info "the gateway's inventory line for this host:"
    echo "${FLUX_HOST:-127.0.0.1} $BASE_PORT $NUM_WORKERS $spec"
    info "worker logs: $LOG_DIR/   status: $0 status   stop: $0 stop"
}

abort_start() {
    trap - INT TERM
    error "$1; stopping what was started"
    cmd_stop >&2 || true
    error "nothing left running; start again when ready"
    exit "$2"
}

# With -c FILE nginx listens where FILE says: that port is checked and shown. NGINX_PORT given as well
# must agree (refused here, before anything starts, naming both).
custom_conf_port() {
    local ports first
    ports="$(python3 "$RENDERER" listen-port "$CUSTOM_CONF")" || fatal "cannot read $CUSTOM_CONF"
    [[ -n "$ports" ]] || fatal "$CUSTOM_CONF has no 'listen' directive"
    first="${ports%% *}"
    if [[ " $ports " == *" $NGINX_PORT "* ]]; then return 0; fi
    if [[ "$NGINX_PORT_GIVEN" == 1 ]]; then
        fatal "$CUSTOM_CONF listens on port $first but NGINX_PORT=$NGINX_PORT; make them agree (or leave NGINX_PORT unset to use the file's port)"
    fi
    info "nginx port $first (from $CUSTOM_CONF)"
    NGINX_PORT="$first"
}

# Compile once for the fleet (see the header): one foreground worker per precision of MODE, on GPU 0.
cmd_prepare() {
    local -a modes
    local prec
    resolve_settings
    resolve_python
    read -r -a modes <<<"$(tr ' ' '\n' <<<"$MODES" | sort -u | tr '\n' ' ')"
    for prec in "${modes[@]}"; do
        info "preparing $prec (compile cache: ${FLUX_COMPILE_CACHE_DIR:-the default, ~/.cache/flux-api/inductor})"
        worker_env 0 "$prec"
        (cd "$FLUX_PROJECT_DIR" && exec env "${WORKER_ENV[@]}" "$PYTHON" -m api.prepare "$prec") ||
            fatal "prepare $prec failed"
    done
}

cmd_stop() {
    load_paths
    local -a pids=() names=()
    local f pid timeout deadline alive
    for f in "$RUN_DIR"/worker_gpu*.pid; do
        [[ -e "$f" ]] || continue
        if pid="$(live_pid "$f" "$FLUX_PROJECT_DIR/main_")"; then
            kill -TERM "$pid" 2>/dev/null || true   # the worker drains: 503 to new work, finishes the rest
            pids+=("$pid")
            names+=("$(basename "$f" .pid)")
        fi
    done
    if pid="$(live_pid "$(nginx_pidfile)" "$(nginx_marker)")"; then
        kill -QUIT "$pid" 2>/dev/null || true       # graceful: open requests are answered first
        pids+=("$pid")
        names+=(nginx)
    fi
    if ((${#pids[@]} == 0)); then
        info "not running"
        rm -f "$RUN_DIR"/worker_gpu*.pid "$RUN_DIR"/worker_gpu*.state "$(nginx_pidfile)" "$(nginx_record)"
        return 0
    fi
    timeout="${FLUX_STOP_TIMEOUT:-$((${FLUX_DRAIN_TIMEOUT:-30} + 15))}"
    info "stopping ${names[*]} (draining, up to ${timeout}s)"
    deadline=$((SECONDS + timeout))
    while :; do
        alive=()
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
        ((${#alive[@]} == 0)) && break
        if ((SECONDS >= deadline)); then
            warn "still running after ${timeout}s, killing: ${alive[*]}"
            for pid in "${alive[@]}"; do signal_tree KILL "$pid"; done
            sleep 0.5
            break
        fi
        sleep 0.5
    done
    # Children left in a worker's process group (e.g. data loader processes) go with it.
    for pid in "${pids[@]}"; do
        pgrep -g "$pid" >/dev/null 2>&1 && signal_tree KILL "$pid"
    done
    rm -f "$RUN_DIR"/worker_gpu*.pid "$RUN_DIR"/worker_gpu*.state "$(nginx_pidfile)" "$(nginx_record)"
    info "stopped"
}

# Loads what `start` recorded so status/monitor describe the running set, not today's defaults.
load_state() {
    load_paths
    local v
    if [[ -f "$STATE_FILE" ]]; then
        NUM_GPUS="$(state_get NUM_GPUS)"
        BASE_PORT="$(state_get BASE_PORT)"
        NGINX_PORT="$(state_get NGINX_PORT)"
        MODES="$(state_get MODES)"
        CPU_MODE="$(state_get CPU_MODE)"
        GPU_SPEC="$(state_get GPU_SPEC)"
        expand_gpu_groups "${GPU_SPEC:-1}" "$NUM_GPUS"
        WORKER_HOST="$(state_get HOST || true)"
        v="$(state_get WORKERS_ONLY || true)"
        [[ "$v" == 1 ]] && WORKERS_ONLY=1
        v="$(state_get NGINX_CONF)"
        [[ -z "$CUSTOM_CONF" ]] && CUSTOM_CONF="$v"
        return 0
    fi
    return 1
}

cmd_status() {
    local rc=0 port
    load_state || true
    if [[ -z "$(worker_records)" || -z "$(running_pids)" ]]; then
        info "not running"
        return 3
    fi
    [[ "${CPU_MODE:-0}" == 1 ]] && banner "CPU demo"
    print_table || rc=1
    port="$(record_get "$(nginx_record)" PORT || true)"
    if live_pid "$(nginx_pidfile)" "$(nginx_marker)" >/dev/null; then
        info "nginx: up on port ${port:-$NGINX_PORT}"
    elif [[ "$WORKERS_ONLY" == 1 ]]; then
        info "nginx: none on this host (workers only, fronted by the fleet's gateway)"
    else
        warn "nginx: down (direct access only)"
    fi
    return "$rc"
}

cmd_restart() {
    local spec_given="$MODE_SPEC_GIVEN"
    if [[ -f "${FLUX_RUN_DIR:-$FLUX_PROJECT_DIR/run}/state" ]]; then
        load_paths
        if [[ "$spec_given" == 0 ]]; then
            # "fp4 fp4 bf16" → "fp4,fp4,bf16" (or the single precision) for the next start.
            MODE_SPEC="$(state_get MODES | tr ' ' ',')"
            [[ "$MODE_SPEC" == *,* && -z "$(tr ',' '\n' <<<"$MODE_SPEC" | sort -u | sed -n 2p)" ]] && MODE_SPEC="${MODE_SPEC%%,*}"
            [[ -n "${NUM_GPUS_ENV:-}" ]] || NUM_GPUS="$(state_get NUM_GPUS)"
        fi
        if [[ "$GPU_SPEC_GIVEN" == 0 ]]; then
            GPU_SPEC="$(state_get GPU_SPEC)"
            GPU_SPEC="${GPU_SPEC:-1}"
        fi
        [[ -n "$CUSTOM_CONF" ]] || CUSTOM_CONF="$(state_get NGINX_CONF)"
        [[ "$(state_get WORKERS_ONLY || true)" != 1 ]] || WORKERS_ONLY=1
    fi
    cmd_stop
    cmd_start
}

# systemd template unit flux-worker@N: one worker in the foreground, its log where the monitor looks.
cmd_worker() {
    local i="$1"
    local -a modes
    [[ "$i" =~ ^[0-9]+$ ]] || fatal "usage: $0 worker GPU_INDEX"
    [[ "$WORKERS_ONLY" == 0 ]] || check_workers_only
    resolve_settings
    if [[ "$GPU_SPEC" == 1 ]]; then
        ((i < NUM_GPUS)) || NUM_GPUS=$((i + 1))
        expand_gpu_groups 1 "$NUM_GPUS"
    fi
    ((i < NUM_WORKERS)) || fatal "worker $i: -g $GPU_SPEC over $NUM_GPUS GPUs makes $NUM_WORKERS workers"
    check_groups_fit_device
    MODES="$(expand_modes "$MODE_SPEC" "$NUM_WORKERS")"
    read -r -a modes <<<"$MODES"
    resolve_python
    mkdir -p "$RUN_DIR" "$LOG_DIR" "$OUTPUT_DIR"
    worker_env "$i" "${modes[$i]}"
    echo $$ >"$(worker_pidfile "$i")"
    write_record "$(worker_record "$i")" "PID=$$" "GPU=$i" "PORT=$(worker_port "$i")" "PRECISION=${modes[$i]}" \
        "STARTED_AT=$(date +%s)" "LOG=$(worker_log "$i")"
    printf '\n=== %s start GPU %s %s port %s ===\n' "$(date '+%F %T')" "$i" "${modes[$i]}" "$(worker_port "$i")" \
        >>"$(worker_log "$i")"
    info "GPU $i ${modes[$i]} worker on port $(worker_port "$i"); log: $(worker_log "$i")"
    cd "$FLUX_PROJECT_DIR"
    exec env "${WORKER_ENV[@]}" "$PYTHON" "$(worker_script "${modes[$i]}")" >>"$(worker_log "$i")" 2>&1
}

# systemd unit flux-nginx: nginx in the foreground for the workers NUM_GPUS/BASE_PORT describe.
cmd_nginx() {
    if [[ "$WORKERS_ONLY" == 1 ]]; then
        info "FLUX_WORKERS_ONLY=1: this host runs workers only; the fleet's gateway is their nginx"
        exit 0
    fi
    resolve_settings
    have nginx || fatal "nginx is not installed ($(nginx_install_hint))"
    prepare_nginx_conf || exit 1
    nginx -t -q -p "$NGINX_PREFIX/" -c "$NGINX_CONF_USED" -g "$NGINX_G" || fatal "nginx -t failed"
    echo $$ >"$(nginx_pidfile)"
    write_record "$(nginx_record)" "PID=$$" "PORT=$NGINX_PORT" "CONF=$NGINX_CONF_USED" "STARTED_AT=$(date +%s)"
    errors="$(escaped_log_fifo "$NGINX_LOG_DIR/error.log")" || fatal "cannot make $NGINX_PREFIX/error-log.fifo"
    exec nginx -p "$NGINX_PREFIX/" -c "$NGINX_CONF_USED" -g "$NGINX_G" \
        >>"$NGINX_LOG_DIR/access.log" 2>"$errors"
}

# The shipped nginx.conf / nginx_mixed.conf are this output for 8 GPUs (paths relative to nginx's prefix,
# images proxied to the workers); `start` renders absolute paths and serves images from the shared folder.
cmd_nginx_conf() {
    local -a args
    resolve_settings
    mapfile -t args < <(worker_args; render_options)
    render_nginx "${args[@]}"
}

main() {
    local cmd=start arg=""
    MODE_SPEC="${FLUX_MODE:-fp4}"
    MODE_SPEC_GIVEN=0
    GPU_SPEC="${FLUX_GPUS_PER_WORKER:-1}"
    GPU_SPEC_GIVEN=0
    CUSTOM_CONF=""
    FLEET_FILE=""
    WORKERS_ONLY=0
    [[ "${FLUX_WORKERS_ONLY:-0}" == 1 ]] && WORKERS_ONLY=1
    NUM_GPUS_ENV="$NUM_GPUS"
    while (($# > 0)); do
        case "$1" in
            start | stop | status | restart | prepare | nginx | nginx-conf | gateway) cmd="$1" ;;
            --workers-only) WORKERS_ONLY=1 ;;
            -f | --fleet) FLEET_FILE="${2:?-f needs an inventory file}"; shift ;;
            worker) cmd=worker; arg="${2:-}"; shift || true ;;
            -m | --mode) MODE_SPEC="${2:?-m needs a mode}"; MODE_SPEC_GIVEN=1; shift ;;
            -g | --gpus-per-worker) GPU_SPEC="${2:?-g needs a GPU count}"; GPU_SPEC_GIVEN=1; shift ;;
            -c | --config)
                CUSTOM_CONF="${2:?-c needs a file}"; shift
                [[ "$CUSTOM_CONF" == /* ]] || CUSTOM_CONF="$PWD/$CUSTOM_CONF" ;;
            -h | --help | help) usage; exit 0 ;;
            *) error "unknown argument '$1'"; usage >&2; exit 2 ;;
        esac
        shift
    done
    if [[ -n "$FLEET_FILE" || "$cmd" == gateway ]]; then
        [[ -n "$FLEET_FILE" ]] || fatal "gateway needs the fleet's inventory: $0 gateway -f fleet.conf"
        [[ "$WORKERS_ONLY" == 0 ]] || fatal "-f (the gateway) and --workers-only (a GPU host) do not go together"
        case "$cmd" in
            gateway) cmd_gateway ;;
            status) cmd_gateway_status ;;
            stop) cmd_gateway_stop ;;
            restart) cmd_gateway_restart ;;
            *) fatal "-f FLEET goes with gateway, status, stop or restart (the workers start on each host: start --workers-only)" ;;
        esac
        return
    fi
    case "$cmd" in
        start) cmd_start ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        restart) cmd_restart ;;
        prepare) cmd_prepare ;;
        worker) cmd_worker "$arg" ;;
        nginx) cmd_nginx ;;
        nginx-conf) cmd_nginx_conf ;;
    esac
}

main "$@"
