# shellcheck shell=bash disable=SC2034,SC2153  # variables set here are read by the scripts that source it
# Shared helpers for start_multi_gpu.sh and monitor_multi_gpu.sh: messages, settings, pid files,
# ports, health checks and the nginx config renderer. Sourced, never run.
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

# Extracts a top-level scalar from a flat JSON object without needing jq.
json_field() {
    local key="$1" json="$2"
    sed -n "s/.*\"$key\"[[:space:]]*:[[:space:]]*\"\{0,1\}\([^\",}]*\)\"\{0,1\}.*/\1/p" <<<"$json" | head -n 1
}

# Worker state from /health: ready | loading | draining | failed | degraded | down.
worker_state() {
    local state
    http_get "http://127.0.0.1:$1/health" 2
    if [[ "$HTTP_CODE" == 000 ]]; then echo down; return; fi
    state="$(json_field status "$HTTP_BODY")"
    if [[ "$HTTP_CODE" == 200 ]]; then echo "${state:-ready}"; else echo "${state:-http$HTTP_CODE}"; fi
}

# ---------------------------------------------------------------------------------------------
# Nginx config
# ---------------------------------------------------------------------------------------------
# render_nginx_conf LISTEN IMAGES_DIR RATE WORKER...
#   LISTEN      port or addr:port nginx listens on
#   IMAGES_DIR  absolute output folder served at /images/; "" proxies /images/ to the workers
#   RATE        per-key rate limit (e.g. 10r/s) or "" for none
#   WORKER      "port:precision" for every worker, e.g. 8000:fp4
# Paths in the output are relative to nginx's prefix (start_multi_gpu.sh passes -p run/nginx/),
# logs go to stdout/stderr (the script redirects them), so the same text passes `nginx -t` anywhere.
render_nginx_conf() {
    local listen="$1" images_dir="$2" rate="$3"
    shift 3
    local workers=("$@") w port prec p fast="" quality="" present=""
    for p in $FLUX_PRECISIONS; do
        for w in "${workers[@]}"; do
            [[ "${w#*:}" == "$p" ]] && { present+=" $p"; break; }
        done
    done
    # Fast path: fp8 where present (fastest on H100), else fp4. Quality: bf16.
    if [[ " $present " == *" fp8 "* ]]; then fast=fp8; elif [[ " $present " == *" fp4 "* ]]; then fast=fp4; fi
    [[ " $present " == *" bf16 "* ]] && quality=bf16
    local fast_upstream="flux_api_backend" quality_upstream="flux_api_backend"
    [[ -n "$fast" ]] && fast_upstream="flux_${fast}_backend"
    [[ -n "$quality" ]] && quality_upstream="flux_${quality}_backend"

    cat <<EOF
# FLUX API load balancer: ${#workers[@]} workers behind one endpoint.
# Rendered by scripts/lib.sh (render_nginx_conf); start_multi_gpu.sh writes one for the workers it
# actually starts to run/nginx/nginx.conf, so GPU count and ports never need editing by hand.
# Print this file for other settings with: NUM_GPUS=4 BASE_PORT=9000 ./start_multi_gpu.sh nginx-conf
#
# Relative paths are relative to nginx's prefix (start_multi_gpu.sh runs nginx with
# -p run/nginx/ and "daemon off", sending stdout to access.log and stderr to error.log).

worker_processes auto;
error_log stderr warn;

events {
    worker_connections 4096;
}

http {
    types {
        image/png  png;
        image/jpeg jpg jpeg;
        image/webp webp;
        application/json json;
    }
    default_type application/json;
    sendfile on;
    tcp_nopush on;
    server_tokens off;
    keepalive_timeout 65s;

    client_body_temp_path client_body_temp;
    proxy_temp_path proxy_temp;
    fastcgi_temp_path fastcgi_temp;
    uwsgi_temp_path uwsgi_temp;
    scgi_temp_path scgi_temp;

    # The client's X-Request-ID when it sends one, else nginx's own; passed to the worker and logged.
    map \$http_x_request_id \$flux_request_id {
        ""      \$request_id;
        default \$http_x_request_id;
    }

    log_format flux_json escape=json '{"time":"\$time_iso8601","request_id":"\$flux_request_id",'
        '"remote_addr":"\$remote_addr","method":"\$request_method","uri":"\$request_uri",'
        '"status":\$status,"bytes_sent":\$body_bytes_sent,"request_time":\$request_time,'
        '"upstream":"\$upstream_addr","upstream_status":"\$upstream_status",'
        '"upstream_time":"\$upstream_response_time","user_agent":"\$http_user_agent"}';
    access_log /dev/stdout flux_json;

EOF
    if [[ -n "$rate" ]]; then
        cat <<EOF
    # Per-key rate limit: the API key (Bearer or X-API-Key), else the client address.
    map \$http_authorization \$flux_bearer_key {
        "~*^Bearer\\s+(?<key>\\S+)\$" \$key;
        default "";
    }
    map "\$http_x_api_key\$flux_bearer_key" \$flux_rate_key {
        ""      \$binary_remote_addr;
        default "\$http_x_api_key\$flux_bearer_key";
    }
    limit_req_zone \$flux_rate_key zone=flux_per_key:10m rate=$rate;
    limit_req_status 429;

EOF
    else
        cat <<'EOF'
    # Per-key rate limiting is off; FLUX_RATE_LIMIT=10r/s ./start_multi_gpu.sh renders it
    # (limit_req keyed on the API key, 429 JSON with Retry-After).

EOF
    fi

    # One upstream for all, one per precision present, one per worker (job routing).
    echo "    upstream flux_api_backend {"
    echo "        least_conn;"
    echo "        zone flux_api_backend 256k;"
    for w in "${workers[@]}"; do
        port="${w%%:*}"
        echo "        server 127.0.0.1:$port max_fails=3 fail_timeout=30s;  # GPU $((port - ${workers[0]%%:*})) ${w#*:}"
    done
    echo "        keepalive 32;"
    echo "        keepalive_timeout 60s;  # below the workers' keep-alive (FLUX_KEEPALIVE_TIMEOUT_S, 75 s)"
    echo "    }"
    echo
    for p in $present; do
        echo "    upstream flux_${p}_backend {"
        echo "        least_conn;"
        echo "        zone flux_${p}_backend 64k;"
        for w in "${workers[@]}"; do
            [[ "${w#*:}" == "$p" ]] && echo "        server 127.0.0.1:${w%%:*} max_fails=3 fail_timeout=30s;"
        done
        echo "        keepalive 32;"
        echo "        keepalive_timeout 60s;"
        echo "    }"
        echo
    done
    echo "    # A job id starts with its worker's id (the port), so polls and cancels reach the owner."
    echo "    # Only known workers are listed: a URL can never name an arbitrary port."
    echo "    map \$uri \$flux_job_upstream {"
    echo "        default \"\";"
    for w in "${workers[@]}"; do
        echo "        ~^/jobs/${w%%:*}- flux_worker_${w%%:*};"
    done
    echo "    }"
    echo
    for w in "${workers[@]}"; do
        echo "    upstream flux_worker_${w%%:*} {"
        echo "        zone flux_worker_${w%%:*} 64k;"
        echo "        server 127.0.0.1:${w%%:*};"
        echo "        keepalive 8;"
        echo "        keepalive_timeout 60s;"
        echo "    }"
    done
    echo

    local limit="" read_timeout="${NGINX_READ_TIMEOUT:-600s}"
    if [[ -n "$rate" && "${FLUX_RATE_BURST:-20}" == 0 ]]; then
        limit="limit_req zone=flux_per_key;"   # nginx refuses burst=0: no burst is written instead
    elif [[ -n "$rate" ]]; then
        limit="limit_req zone=flux_per_key burst=${FLUX_RATE_BURST:-20} nodelay;"
    fi
    cat <<EOF
    server {
        listen $listen;
        client_max_body_size ${NGINX_MAX_BODY:-1m};

        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host \$http_host;
        proxy_set_header X-Real-IP \$remote_addr;
        proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto \$scheme;
        proxy_set_header X-Request-ID \$flux_request_id;

        # A dead worker refuses the connection at once: try the next one. A POST that already
        # reached a worker is never sent twice (no non_idempotent), and a worker's 503 (queue
        # full, draining) goes back to the client with its Retry-After without marking it down.
        proxy_next_upstream error timeout;
        proxy_connect_timeout 3s;
        proxy_send_timeout 60s;
        # Longer than the worst queue wait plus a generation.
        proxy_read_timeout $read_timeout;

        error_page 502 /_flux_errors/502;
        error_page 504 /_flux_errors/504;
        error_page 413 /_flux_errors/413;
        error_page 429 /_flux_errors/429;

        location = /generate {
            $limit
            proxy_pass http://flux_api_backend;
        }

        # Mixed deployments: fast and quality pools; the worker sees a plain /generate.
        location = /generate/fast {
            $limit
            proxy_pass http://$fast_upstream/generate;
        }

        location = /generate/quality {
            $limit
            proxy_pass http://$quality_upstream/generate;
        }

        location /v1/ {
            $limit
            proxy_pass http://flux_api_backend;
        }

        location = /jobs {
            $limit
            proxy_pass http://flux_api_backend;
        }

        location /jobs/ {
            if (\$flux_job_upstream = "") {
                return 404 '{"error":{"code":"job_not_found","message":"unknown job id"}}\n';
            }
            proxy_pass http://\$flux_job_upstream;
        }

        # Server-sent progress events: no buffering, long reads.
        location ~ ^/jobs/[^/]+/events\$ {
            if (\$flux_job_upstream = "") {
                return 404 '{"error":{"code":"job_not_found","message":"unknown job id"}}\n';
            }
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 3600s;
            proxy_pass http://\$flux_job_upstream;
        }

EOF
    if [[ -n "$images_dir" ]]; then
        cat <<EOF
        # Images straight from the shared output folder; a miss asks a worker.
        location /images/ {
            alias $images_dir/;
            add_header Cache-Control "public, max-age=3600";
            error_page 404 = @image_from_worker;
        }

        location @image_from_worker {
            proxy_pass http://flux_api_backend;
        }

EOF
    else
        cat <<'EOF'
        # Images: every worker serves the shared output folder (start_multi_gpu.sh renders an alias
        # to the folder instead so nginx sends the files itself).
        location /images/ {
            proxy_pass http://flux_api_backend;
        }

EOF
    fi
    # >>> web UI and fleet dashboard (static, from <prefix>/web -> <project>/web; start_multi_gpu.sh
    # links it and writes <prefix>/workers.json). Read-only per-worker probes for the dashboard.
    cat <<'EOF'
        location = /ui { absolute_redirect off; return 301 /ui/; }
        location = /dashboard { absolute_redirect off; return 301 /dashboard/; }
        location /workers/ {
            return 404 '{"error":{"code":"not_found","message":"unknown worker id"}}\n';
        }
        location ~ ^/(ui|dashboard)/ {
            root web;
            absolute_redirect off;
            types {
                text/html html;
                text/css css;
                application/javascript js;
                image/svg+xml svg;
                image/png png;
                application/json json;
            }
            default_type text/plain;
            limit_except GET { deny all; }
            add_header Cache-Control "no-cache" always;
            add_header X-Content-Type-Options nosniff always;
            add_header Content-Security-Policy "default-src 'self'; img-src 'self' data: blob: http: https:; frame-ancestors 'none'" always;
        }

        location = /dashboard/workers.json {
            alias workers.json;
            default_type application/json;
            add_header Cache-Control "no-store" always;
        }

        location = /dashboard/nginx_status {
            stub_status;
            default_type text/plain;
            add_header Cache-Control "no-store" always;
        }

EOF
    for w in "${workers[@]}"; do
        port="${w%%:*}"
        echo "        location ~ ^/workers/$port(/(health|queue-stats)?)\$ {"
        echo "            limit_except GET { deny all; }"
        echo "            proxy_pass http://flux_worker_$port\$1;"
        echo "        }"
        echo "        location = /workers/$port/metrics {"
        echo "            allow 127.0.0.1;"
        echo "            allow ::1;"
        echo "            deny all;"
        echo "            proxy_pass http://flux_worker_$port/metrics;"
        echo "        }"
    done
    echo
    # <<< web UI and fleet dashboard
    cat <<'EOF'
        # Scrape workers one by one for Prometheus; through the balancer only from this host.
        location = /metrics {
            allow 127.0.0.1;
            allow ::1;
            deny all;
            proxy_pass http://flux_api_backend;
        }

        location / {
            proxy_pass http://flux_api_backend;
        }

        location = /_flux_errors/502 {
            internal;
            add_header X-Request-ID $flux_request_id always;
            return 502 '{"error":{"code":"bad_gateway","message":"no worker could answer; retry shortly"}}\n';
        }

        location = /_flux_errors/504 {
            internal;
            add_header X-Request-ID $flux_request_id always;
            return 504 '{"error":{"code":"gateway_timeout","message":"the worker did not answer in time"}}\n';
        }

        location = /_flux_errors/413 {
            internal;
            add_header X-Request-ID $flux_request_id always;
            return 413 '{"error":{"code":"payload_too_large","message":"request body too large"}}\n';
        }

        location = /_flux_errors/429 {
            internal;
            add_header X-Request-ID $flux_request_id always;
            add_header Retry-After 1 always;
            return 429 '{"error":{"code":"rate_limited","message":"too many requests for this key"}}\n';
        }
    }
}
EOF
}
