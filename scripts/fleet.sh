# shellcheck shell=bash disable=SC2034,SC2153  # variables set here are read by the scripts that source it
# A fleet of GPU hosts behind one nginx gateway: `start_multi_gpu.sh gateway|status|stop|restart -f FLEET`.
# Sourced by start_multi_gpu.sh (after scripts/lib.sh), never run. The inventory is parsed, checked and probed by
# scripts/fleet.py; the gateway's config comes from the same renderer as the single-host one (scripts/render_nginx.py,
# via start_multi_gpu.sh's start_nginx), with every worker of every host and no local image folder (images are
# proxied to the owner, or redirected to S3 by any worker).
#
# The gateway keeps its own state apart from any workers of the same host: FLUX_RUN_DIR/gateway/ (pid, records,
# nginx prefix and config), logs in NGINX_LOG_DIR (default FLUX_LOG_DIR/gateway).

FLEET_PY="$FLUX_PROJECT_DIR/scripts/fleet.py"
NGINX_LOG_DIR_GIVEN="${NGINX_LOG_DIR:-}"   # as given, before load_paths fills in the single-host default

load_gateway_paths() {
    load_paths
    RUN_DIR="$RUN_DIR/gateway"
    STATE_FILE="$RUN_DIR/state"
    NGINX_PREFIX="$RUN_DIR/nginx"
    NGINX_LOG_DIR="${NGINX_LOG_DIR_GIVEN:-$LOG_DIR/gateway}"
    [[ "$FLEET_FILE" == /* ]] || FLEET_FILE="$PWD/$FLEET_FILE"
    [[ -f "$FLEET_FILE" ]] || fatal "fleet inventory $FLEET_FILE not found (one line per host: ADDRESS BASE_PORT NUM_WORKERS [MODES])"
}

# The renderer's arguments for every worker of the inventory (as a JSON file: IPv6 addresses hold colons).
fleet_worker_args() {
    mkdir -p "$NGINX_PREFIX"
    python3 "$FLEET_PY" workers-json -f "$FLEET_FILE" --out "$NGINX_PREFIX/fleet-workers.json" >&2 || return 1
    printf -- '--workers-file\n%s\n' "$NGINX_PREFIX/fleet-workers.json"
    printf -- '--max-fails\n%s\n--fail-timeout\n%s\n' "${NGINX_MAX_FAILS:-3}" "${NGINX_FAIL_TIMEOUT:-30s}"
}

gateway_url() {
    local host="${NGINX_ADDR:-127.0.0.1}"
    [[ "$host" == 0.0.0.0 ]] && host=127.0.0.1
    echo "http://$host:$NGINX_PORT"
}

cmd_gateway() {
    local rc=0 total
    load_gateway_paths
    [[ "$NGINX_PORT" =~ ^[0-9]+$ ]] || fatal "NGINX_PORT must be a number, got '$NGINX_PORT'"
    [[ -z "$CUSTOM_CONF" ]] || fatal "gateway renders its config from the inventory: -c does not apply"
    python3 "$FLEET_PY" check -f "$FLEET_FILE" --gateway-addr "${NGINX_ADDR:-}" --gateway-port "$NGINX_PORT" >/dev/null || exit 2
    if live_pid "$(nginx_pidfile)" "$(nginx_marker)" >/dev/null; then
        fatal "the gateway already runs (pid $(read_pid "$(nginx_pidfile)")); use '$0 status -f $FLEET_FILE' or '$0 stop -f $FLEET_FILE'"
    fi
    have nginx || fatal "nginx is not installed ($(nginx_install_hint))"
    mkdir -p "$RUN_DIR" "$NGINX_LOG_DIR"
    total="$(python3 "$FLEET_PY" check -f "$FLEET_FILE" | wc -l)"
    info "gateway for $total host(s) of $FLEET_FILE on port $NGINX_PORT"
    {
        echo "FLEET_FILE=$FLEET_FILE"
        echo "NGINX_PORT=$NGINX_PORT"
        echo "NGINX_ADDR=${NGINX_ADDR:-}"
    } >"$STATE_FILE"
    NUM_GPUS=0 MODES=""
    start_nginx || rc=$?
    # No fallback here: without nginx there is no entry point to the fleet.
    ((rc == 0)) || fatal "the gateway did not start (see above; logs in $NGINX_LOG_DIR)"
    echo
    python3 "$FLEET_PY" status -f "$FLEET_FILE" --gateway "$(gateway_url)" --marker "$(nginx_marker_token)" || true
    echo
    banner "Fleet endpoint: $(gateway_url)/generate   (nginx, least_conn over every worker of every host)"
    info "a host that goes down leaves the rotation after ${NGINX_MAX_FAILS:-3} failed attempts and is tried again every ${NGINX_FAIL_TIMEOUT:-30s}"
    info "gateway logs: $NGINX_LOG_DIR/access.log (JSON), $NGINX_LOG_DIR/error.log   status: $0 status -f $FLEET_FILE"
}

# The gateway's status, then every host's workers: exit 0 all ready, 1 some not ready, 3 gateway not running.
cmd_gateway_status() {
    local port addr
    load_gateway_paths
    port="$(record_get "$(nginx_record)" PORT || true)"
    addr="$(state_get NGINX_ADDR || true)"
    NGINX_PORT="${port:-$NGINX_PORT}" NGINX_ADDR="${addr:-${NGINX_ADDR:-}}"
    if ! live_pid "$(nginx_pidfile)" "$(nginx_marker)" >/dev/null; then
        python3 "$FLEET_PY" status -f "$FLEET_FILE" || true
        warn "gateway: not running ($0 gateway -f $FLEET_FILE starts it)"
        return 3
    fi
    python3 "$FLEET_PY" status -f "$FLEET_FILE" --gateway "$(gateway_url)" --marker "$(nginx_marker_token)"
}

# Stops the gateway only (the hosts' workers are each host's own: `start_multi_gpu.sh stop` there). nginx
# finishes the requests it holds (QUIT), up to FLUX_STOP_TIMEOUT.
cmd_gateway_stop() {
    local pid timeout deadline
    load_gateway_paths
    if ! pid="$(live_pid "$(nginx_pidfile)" "$(nginx_marker)")"; then
        info "gateway: not running"
        rm -f "$(nginx_pidfile)" "$(nginx_record)"
        return 0
    fi
    kill -QUIT "$pid" 2>/dev/null || true
    timeout="${FLUX_STOP_TIMEOUT:-$((${FLUX_DRAIN_TIMEOUT:-30} + 15))}"
    info "stopping the gateway (pid $pid; open requests finish first, up to ${timeout}s)"
    deadline=$((SECONDS + timeout))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            warn "gateway still running after ${timeout}s, killing it"
            signal_tree KILL "$pid"
            break
        fi
        sleep 0.2
    done
    rm -f "$(nginx_pidfile)" "$(nginx_record)"
    info "gateway stopped"
}

# After editing the inventory (a host added or removed): the running gateway reloads a config rendered from it
# (nginx HUP: new connections get the new config, requests in flight finish on the old one, the port never
# closes). A bad inventory, a setting the renderer refuses or a config nginx -t rejects leaves the running
# gateway and its config as they were. Not running: the gateway starts.
cmd_gateway_restart() {
    local pid port saved
    load_gateway_paths
    if ! pid="$(live_pid "$(nginx_pidfile)" "$(nginx_marker)")"; then
        cmd_gateway   # checks the inventory itself
        return
    fi
    port="$(record_get "$(nginx_record)" PORT || true)"
    # the port and address it runs on, unless others are asked for
    [[ -z "${NGINX_PORT_GIVEN:-}" && -n "$port" ]] && NGINX_PORT="$port"
    [[ -n "${NGINX_ADDR:-}" ]] || NGINX_ADDR="$(state_get NGINX_ADDR || true)"
    [[ "$NGINX_PORT" =~ ^[0-9]+$ ]] || fatal "NGINX_PORT must be a number, got '$NGINX_PORT'"
    python3 "$FLEET_PY" check -f "$FLEET_FILE" --gateway-addr "${NGINX_ADDR:-}" --gateway-port "$NGINX_PORT" >/dev/null ||
        fatal "the inventory has an error (above); the gateway keeps running as it was"
    saved="$NGINX_PREFIX/nginx.conf.running"
    cp -p "$NGINX_PREFIX/nginx.conf" "$saved"
    rm -f "$NGINX_PREFIX/test.log"
    NUM_GPUS=0 MODES=""
    if ! prepare_nginx_conf || ! nginx -t -q -p "$NGINX_PREFIX/" -c "$NGINX_CONF_USED" -g "$NGINX_G" >"$NGINX_PREFIX/test.log" 2>&1; then
        [[ ! -s "$NGINX_PREFIX/test.log" ]] || sed 's/^/    /' "$NGINX_PREFIX/test.log" >&2
        mv "$saved" "$NGINX_PREFIX/nginx.conf"
        fatal "the new gateway config was refused (above); the gateway keeps running with its old config"
    fi
    rm -f "$saved"
    {
        echo "FLEET_FILE=$FLEET_FILE"
        echo "NGINX_PORT=$NGINX_PORT"
        echo "NGINX_ADDR=${NGINX_ADDR:-}"
    } >"$STATE_FILE"
    write_record "$(nginx_record)" "PID=$pid" "PORT=$NGINX_PORT" "CONF=$NGINX_CONF_USED" "STARTED_AT=$(date +%s)"
    kill -HUP "$pid"
    info "gateway (pid $pid) reloaded with $FLEET_FILE: requests in flight finish on the old config"
    echo
    python3 "$FLEET_PY" status -f "$FLEET_FILE" --gateway "$(gateway_url)" --marker "$(nginx_marker_token)" || true
}
