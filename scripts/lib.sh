# shellcheck shell=bash disable=SC2034,SC2153  # variables set here are read by the scripts that source it
# Shared helpers for start_multi_gpu.sh and monitor_multi_gpu.sh: messages, settings, pid files,
# ports, health checks, state records and the call into the nginx renderer (scripts/render_nginx.py).
# Sourced, never run.
#
# Environment variables read here (all optional; the scripts' headers repeat them):
#   FLUX_RUN_DIR        pid files, run state and nginx's prefix        (default <project>/run)
#   FLUX_LOG_DIR        worker logs                                     (default <project>/logs/multi_gpu)
#   FLUX_OUTPUT_DIR     images, shared by every worker and nginx        (default <project>/outputs)
#   NGINX_LOG_DIR       nginx access.log (JSON lines) / error.log       (default FLUX_LOG_DIR/nginx)
#   FLUX_DEVICE         auto | cuda | cpu; cpu (or no nvidia-smi) starts the CPU demo
#   FLUX_HOST           address the workers bind                        (default 127.0.0.1)
#   FLUX_RATE_LIMIT     per-key nginx rate limit such as 10r/s          (default: off)
#   FLUX_RATE_BURST     requests allowed above the rate before 429      (default 20)
#   NGINX_MAX_BODY      client_max_body_size                            (default 1m)
#   NGINX_READ_TIMEOUT  proxy_read_timeout: longest queue wait + generation (default 600s)
#   NO_COLOR            plain output

FLUX_PROJECT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FLUX_PRECISIONS="fp4 bf16 fp8"

# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------
if [[ -t 1 && -z "${NO_COLOR:-}" ]]; then
    C_RED=$'\e[31m' C_GREEN=$'\e[32m' C_YELLOW=$'\e[33m' C_BOLD=$'\e[1m' C_RESET=$'\e[0m'
else
    C_RED="" C_GREEN="" C_YELLOW="" C_BOLD="" C_RESET=""
fi

info()  { printf '%s[INFO]%s %s\n' "$C_GREEN" "$C_RESET" "$*"; }
warn()  { printf '%s[WARN]%s %s\n' "$C_YELLOW" "$C_RESET" "$*" >&2; }
error() { printf '%s[ERROR]%s %s\n' "$C_RED" "$C_RESET" "$*" >&2; }
fatal() { error "$@"; exit 1; }
banner() { printf '%s%s%s\n' "$C_BOLD" "$*" "$C_RESET"; }

# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
# Fills the FLUX_* paths. The scripts set NUM_GPUS/BASE_PORT/NGINX_PORT themselves (their tops are
# the place the guide tells users to edit).
load_paths() {
    RUN_DIR="${FLUX_RUN_DIR:-$FLUX_PROJECT_DIR/run}"
    LOG_DIR="${FLUX_LOG_DIR:-$FLUX_PROJECT_DIR/logs/multi_gpu}"
    OUTPUT_DIR="${FLUX_OUTPUT_DIR:-$FLUX_PROJECT_DIR/outputs}"
    STATE_FILE="$RUN_DIR/state"
    NGINX_PREFIX="$RUN_DIR/nginx"
    # Our nginx's logs stay with the workers' (logrotate covers both); NGINX_LOG_DIR=/var/log/nginx
    # puts them where a system nginx keeps its own.
    NGINX_LOG_DIR="${NGINX_LOG_DIR:-$LOG_DIR/nginx}"
}

have() { command -v "$1" >/dev/null 2>&1; }

# True when the workers must run on CPU: asked for, or no NVIDIA driver to ask.
cpu_mode() {
    [[ "${FLUX_DEVICE:-auto}" == cpu ]] && return 0
    [[ "${FLUX_DEVICE:-auto}" == cuda ]] && return 1
    ! have nvidia-smi || ! nvidia-smi -L >/dev/null 2>&1
}

detect_gpu_count() {
    local n
    if cpu_mode; then echo 1; return; fi
    n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
    [[ "$n" =~ ^[0-9]+$ && "$n" -gt 0 ]] && echo "$n" || echo 1
}

# Expands -m into one precision per worker. fp4|bf16|fp8: every worker; mixed: the first half fp4,
# the rest bf16 (the guide's "first 4 GPUs FP4, the rest BF16"); a comma list gives each GPU its own.
expand_modes() {
    local spec="$1" count="$2" i fast modes=()
    case "$spec" in
        fp4|bf16|fp8)
            for ((i = 0; i < count; i++)); do modes+=("$spec"); done ;;
        mixed)
            fast=$(((count + 1) / 2))
            for ((i = 0; i < count; i++)); do
                if ((i < fast)); then modes+=(fp4); else modes+=(bf16); fi
            done ;;
        *,*)
            IFS=, read -r -a modes <<<"$spec"
            [[ ${#modes[@]} -eq "$count" ]] ||
                fatal "-m $spec names ${#modes[@]} precisions but NUM_GPUS=$count"
            for i in "${modes[@]}"; do
                [[ " $FLUX_PRECISIONS " == *" $i "* ]] || fatal "unknown precision '$i' in -m $spec (fp4, bf16, fp8)"
            done ;;
        *) fatal "unknown mode '$spec': use fp4, bf16, fp8, mixed or a per-GPU list like fp4,fp4,bf16,bf16" ;;
    esac
    echo "${modes[*]}"
}

# The run state written by `start` so `status`, `stop` and the monitor find the same workers.
write_state() {
    mkdir -p "$RUN_DIR"
    {
        echo "NUM_GPUS=$NUM_GPUS"
        echo "BASE_PORT=$BASE_PORT"
        echo "NGINX_PORT=$NGINX_PORT"
        echo "MODES=$MODES"
        echo "CPU_MODE=$CPU_MODE"
        echo "NGINX_CONF=${NGINX_CONF:-}"
        echo "PYTHON=${PYTHON:-}"
    } >"$STATE_FILE.tmp"
    mv "$STATE_FILE.tmp" "$STATE_FILE"
}

state_set() {
    [[ -f "$STATE_FILE" ]] || return 0
    sed -i "/^$1=/d" "$STATE_FILE"
    echo "$1=$2" >>"$STATE_FILE"
}

# Prints one value from the state file (never sourced: it is data, not code).
state_get() {
    [[ -f "$STATE_FILE" ]] || return 1
    sed -n "s/^$1=//p" "$STATE_FILE" | head -n 1
}

# State records: whichever entry point starts a worker or nginx (start, or the systemd units' `worker N`
# and `nginx`) writes run/worker_gpu{i}.state / run/nginx.state (NAME=value lines: PID, GPU, PORT,
# PRECISION, STARTED_AT, LOG / CONF); status and the monitor describe what these records say runs.
write_record() {
    local file="$1"
    shift
    mkdir -p "$RUN_DIR"
    printf '%s\n' "$@" >"$file.tmp"
    mv "$file.tmp" "$file"
}

record_get() { [[ -f "$1" ]] && sed -n "s/^$2=//p" "$1" | head -n 1; }

worker_record() { echo "$RUN_DIR/worker_gpu$1.state"; }
nginx_record() { echo "$RUN_DIR/nginx.state"; }

# The worker records present, in GPU order.
worker_records() {
    local f
    for f in "$RUN_DIR"/worker_gpu*.state; do [[ -e "$f" ]] && echo "$f"; done | sort -V
}

worker_port() { echo $((BASE_PORT + $1)); }
worker_log() { echo "$LOG_DIR/flux_gpu$1_port$(worker_port "$1").log"; }
worker_pidfile() { echo "$RUN_DIR/worker_gpu$1.pid"; }
nginx_pidfile() { echo "$RUN_DIR/nginx.pid"; }
worker_script() { echo "$FLUX_PROJECT_DIR/main_$1.py"; }
port_env_name() { printf '%s_API_PORT' "$(tr '[:lower:]' '[:upper:]' <<<"$1")"; }

# ---------------------------------------------------------------------------------------------
# Processes and ports
# ---------------------------------------------------------------------------------------------
read_pid() {
    local pid
    [[ -f "$1" ]] || return 1
    pid="$(head -n 1 "$1" 2>/dev/null)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    echo "$pid"
}

# True when pid is alive and its command line contains the marker (the worker's script path, or
# our nginx prefix): a recycled pid that now runs something else is never signalled.
pid_runs() {
    local pid="$1" marker="$2" args
    kill -0 "$pid" 2>/dev/null || return 1
    args="$(ps -o args= -p "$pid" 2>/dev/null)" || return 1
    [[ "$args" == *"$marker"* ]]
}

# Prints the pid from a pid file when it still runs our command; removes a stale file.
live_pid() {
    local pidfile="$1" marker="$2" pid
    pid="$(read_pid "$pidfile")" || return 1
    if pid_runs "$pid" "$marker"; then
        echo "$pid"
        return 0
    fi
    rm -f "$pidfile"
    return 1
}

worker_marker() { worker_script "$1"; }
nginx_marker() { echo "$NGINX_PREFIX"; }
# What our nginx answers at /nginx-health: a token of this installation's prefix, so a program that merely
# holds the port (or another nginx) is never taken for ours.
nginx_marker_token() { printf '%s' "$NGINX_PREFIX" | sha256sum | cut -c1-16; }

# Who listens on a TCP port: "pid/command", or "" when free.
port_holder() {
    local port="$1" out
    if have lsof; then
        out="$(lsof -nP -iTCP:"$port" -sTCP:LISTEN -Fpc 2>/dev/null | awk '/^p/{p=substr($0,2)} /^c/{print p "/" substr($0,2); exit}')"
        [[ -n "$out" ]] && { echo "$out"; return; }
    fi
    if have ss; then
        out="$(ss -Htlnp "sport = :$port" 2>/dev/null | head -n 1)"
        if [[ -n "$out" ]]; then
            sed -n 's/.*users:((\"\([^\"]*\)\",pid=\([0-9]*\).*/\2\/\1/p' <<<"$out" | grep . || echo "unknown process"
            return
        fi
    fi
    # Last resort without lsof/ss: a successful connect means someone listens.
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "unknown process"; fi
}

port_in_use() { [[ -n "$(port_holder "$1")" ]]; }

# Sends sig to the process group led by pid when it leads one (setsid), else to pid alone.
signal_tree() {
    local sig="$1" pid="$2" pgid
    pgid="$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')"
    if [[ "$pgid" == "$pid" ]]; then
        kill "-$sig" -- "-$pid" 2>/dev/null || true
    else
        kill "-$sig" "$pid" 2>/dev/null || true
    fi
}

# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------
# GET url → HTTP_BODY and HTTP_CODE (000 when nothing answered). No subshell, so callers see both.
http_get() {
    local out
    out="$(curl -s --max-time "${2:-3}" -w '\n%{http_code}' "$1" 2>/dev/null)" || true
    HTTP_CODE="${out##*$'\n'}"
    [[ "$HTTP_CODE" =~ ^[0-9]{3}$ ]] || HTTP_CODE=000
    HTTP_BODY="${out%$'\n'*}"
    [[ "$out" == *$'\n'* ]] || HTTP_BODY=""
}

# json_get JSON KEY...: one line per KEY with its top-level value ("" when missing, not a scalar, or not
# JSON), control characters blanked. A real JSON parser: python3's, stdlib only.
json_get() {
    local json="$1"
    shift
    python3 "$RENDERER" json-get "$@" <<<"$json" 2>/dev/null || printf '\n%.0s' "$@"
}

# The address this host's workers are reached on: FLUX_HOST as they bind it (a wildcard: loopback).
# WORKER_HOST, when set (status/monitor: as recorded at start), wins.
probe_host() {
    local host="${WORKER_HOST:-${FLUX_HOST:-127.0.0.1}}"
    host="${host#[}" host="${host%]}"
    case "$host" in
        "" | 0.0.0.0) echo 127.0.0.1 ;;
        ::) echo "[::1]" ;;
        *:*) echo "[$host]" ;;
        *) echo "$host" ;;
    esac
}

# A worker's id (FLUX_WORKER_ID: the prefix of its job ids and image names). One host: its port. A worker of a
# fleet (--workers-only, or FLUX_HOST a specific address other than loopback): h<FLUX_HOST>_<port>, every
# character other than a letter or digit as "_", the id the gateway derives from the inventory
# (scripts/fleet.py worker_id), so ids are unique fleet-wide and name their host.
worker_id_for() {
    local port="$1" host="${FLUX_HOST:-127.0.0.1}"
    host="${host#[}" host="${host%]}"
    if [[ "${WORKERS_ONLY:-0}" == 1 ]] ||
        [[ "$host" != 127.0.0.1 && "$host" != localhost && "$host" != ::1 && "$host" != 0.0.0.0 && "$host" != :: ]]; then
        echo "h${host//[^A-Za-z0-9]/_}_$port"
    else
        echo "$port"
    fi
}

# Worker state from /health: ready | loading | draining | failed | degraded | down.
worker_state() {
    http_get "http://$(probe_host):$1/health" 2
    health_state
}

# The state in the /health answer http_get last fetched (HTTP_CODE, HTTP_BODY).
health_state() {
    local state
    if [[ "$HTTP_CODE" == 000 ]]; then echo down; return; fi
    state="$(json_get "$HTTP_BODY" status)"
    if [[ "$HTTP_CODE" == 200 ]]; then echo "${state:-ready}"; else echo "${state:-http$HTTP_CODE}"; fi
}

# ---------------------------------------------------------------------------------------------
# Nginx config: rendered by scripts/render_nginx.py from deploy/nginx/flux.conf.j2
# ---------------------------------------------------------------------------------------------
RENDERER="$FLUX_PROJECT_DIR/scripts/render_nginx.py"

# The interpreter that can render (it needs jinja2): the workers' python, the project's .venv, python3.
renderer_python() {
    local py
    for py in "${FLUX_PYTHON:-}" "${PYTHON:-}" "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}" \
        "$FLUX_PROJECT_DIR/.venv/bin/python" python3; do
        [[ -n "$py" ]] || continue
        if "$py" -c 'import jinja2' >/dev/null 2>&1; then echo "$py"; return 0; fi
    done
    error "no python with jinja2 to render the nginx config: run ./start_multi_gpu.sh once (it creates .venv)" \
        "or: pip install jinja2"
    return 1
}

# escaped_log_fifo FILE: prints the path of a FIFO whose lines are appended to FILE with every control character
# escaped (scripts/escape_log.py): nginx's stderr goes there, as nginx copies a client's Referer and request line
# into its error log byte for byte.   nginx ... 2>"$(escaped_log_fifo "$NGINX_LOG_DIR/error.log")"
# The filter is started in a subshell that exits at once, so it is nobody's child: not nginx's (which is exec'd
# in place of the systemd entry point's shell; its children are its workers), not a zombie's. It ends when the
# last nginx process has closed the FIFO.
escaped_log_fifo() {
    local py fifo="$NGINX_PREFIX/error-log.fifo"
    for py in "${FLUX_PYTHON:-}" "${PYTHON:-}" "$FLUX_PROJECT_DIR/.venv/bin/python" python3; do
        [[ -n "$py" ]] && command -v "$py" >/dev/null 2>&1 && break
    done
    mkdir -p "$NGINX_PREFIX"
    rm -f "$fifo"
    mkfifo -m 600 "$fifo" || return 1
    # FILE before the FIFO: opening the FIFO waits for nginx, and meanwhile no other output may be held open
    ("$py" "$FLUX_PROJECT_DIR/scripts/escape_log.py" >>"$1" 2>&1 <"$fifo" &)
    echo "$fifo"
}

# render_nginx ARGS...: scripts/render_nginx.py's options (--listen, --worker port:precision, --out, ...).
render_nginx() {
    local py
    py="$(renderer_python)" || return 1
    "$py" "$RENDERER" "$@"
}
