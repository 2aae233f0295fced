#!/usr/bin/env bash
# Live view of the FLUX workers started by start_multi_gpu.sh: GPUs, queues, health, nginx.
#
# Usage: ./monitor_multi_gpu.sh [--once] [--errors] [--interval SECONDS] [-f FLEET]
#   (none)         refresh every 2 s until Ctrl-C
#   --once         print once; exit 1 when any worker is not ready or nginx is down (cron, CI)
#   --errors       also show the last error lines of every worker log, from its current run (since the
#                  worker last started)
#   --all-errors   --errors, plus earlier runs' errors, each marked [earlier run]
#   --interval N   seconds between refreshes (default 2)
#   -f FLEET       the fleet of FLEET's inventory (run where its gateway runs): per host, per worker,
#                  totals and the gateway (start_multi_gpu.sh status -f FLEET, refreshed)
#
# Which workers: the records in run/ written by whichever start_multi_gpu.sh entry point started them
# (start, or the systemd units' `worker N` / `nginx`); without them, NUM_GPUS workers from BASE_PORT
# (the same defaults as start_multi_gpu.sh). nginx is "up" only when the nginx on the port is this
# installation's (its /nginx-health token, or our pid holding the port); text from workers and logs is
# printed without control characters.
#
# Environment:
#   NUM_GPUS        workers to watch (default: as started, else every GPU nvidia-smi lists, 1 on CPU)
#   BASE_PORT       port of worker 0 (default: as started, else 8000)
#   NGINX_PORT      nginx port (default: as started, else 80)
#   FLUX_RUN_DIR    where start_multi_gpu.sh keeps its state (default ./run)
#   FLUX_LOG_DIR    worker logs (default ./logs/multi_gpu)
#   ERROR_LINES     lines per log shown by --errors (default 5)
#   NO_COLOR        plain output
set -euo pipefail

NUM_GPUS="${NUM_GPUS:-}"      # empty: the workers start_multi_gpu.sh started
BASE_PORT="${BASE_PORT:-}"
NGINX_PORT="${NGINX_PORT:-}"

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/scripts/lib.sh"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

# The workers to watch: the records start_multi_gpu.sh's entry points write (start, or the systemd units'
# `worker N`), unless NUM_GPUS/BASE_PORT are given; without records, NUM_GPUS workers from BASE_PORT.
resolve_targets() {
    local f i port
    load_paths
    GPUS=() PORTS=() LOGS=()
    if [[ -z "$NUM_GPUS" && -z "$BASE_PORT" ]]; then
        while IFS= read -r f; do
            i="$(record_get "$f" GPU)"
            port="$(record_get "$f" PORT)"
            [[ "$i" =~ ^[0-9]+$ && "$port" =~ ^[0-9]+$ ]] || continue
            GPUS+=("$i") PORTS+=("$port") LOGS+=("$(record_get "$f" LOG)")
        done < <(worker_records)
    fi
    if ((${#GPUS[@]} == 0)); then
        [[ -n "$NUM_GPUS" ]] || NUM_GPUS="$(state_get NUM_WORKERS 2>/dev/null || true)"   # -g groups GPUs
        [[ -n "$NUM_GPUS" ]] || NUM_GPUS="$(state_get NUM_GPUS 2>/dev/null || true)"
        [[ -n "$NUM_GPUS" ]] || NUM_GPUS="$(detect_gpu_count)"
        [[ -n "$BASE_PORT" ]] || BASE_PORT="$(state_get BASE_PORT 2>/dev/null || true)"
        [[ -n "$BASE_PORT" ]] || BASE_PORT=8000
        [[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]] || fatal "NUM_GPUS must be a positive number, got '$NUM_GPUS'"
        [[ "$BASE_PORT" =~ ^[0-9]+$ ]] || fatal "BASE_PORT must be a number, got '$BASE_PORT'"
        for ((i = 0; i < NUM_GPUS; i++)); do
            GPUS+=("$i") PORTS+=("$((BASE_PORT + i))") LOGS+=("$LOG_DIR/flux_gpu${i}_port$((BASE_PORT + i)).log")
        done
    fi
    NUM_GPUS="${#GPUS[@]}"
    [[ -n "$NGINX_PORT" ]] || NGINX_PORT="$(record_get "$(nginx_record)" PORT 2>/dev/null || true)"
    [[ -n "$NGINX_PORT" ]] || NGINX_PORT="$(state_get NGINX_PORT 2>/dev/null || true)"
    [[ -n "$NGINX_PORT" ]] || NGINX_PORT=80
    WORKER_HOST="$(state_get HOST 2>/dev/null || true)"
    NGINX_EXPECTED="$(state_get NGINX 2>/dev/null || true)"
    [[ -f "$(nginx_record)" ]] && NGINX_EXPECTED=up
    return 0
}

# Prints text from workers and logs without control characters (no escape sequence reaches the terminal).
clean() { LC_ALL=C tr -d '\000-\010\013-\037\177' | LC_ALL=C tr '\011' ' '; }

# "ours" when the nginx on the port is the one this installation runs: the rendered config answers
# /nginx-health with this prefix's token; a custom (-c) config is ours when our nginx pid holds the port.
# Else the holder ("pid/command") or "" when the port is free.
nginx_probe() {
    local host="${NGINX_ADDR:-127.0.0.1}" holder pid
    [[ "$host" == 0.0.0.0 || "$host" == "*" ]] && host=127.0.0.1
    http_get "http://$host:$NGINX_PORT/nginx-health" 2
    if [[ "$HTTP_CODE" == 200 && "$HTTP_BODY" == "flux-nginx $(nginx_marker_token)" ]]; then echo ours; return; fi
    holder="$(port_holder "$NGINX_PORT")"
    if pid="$(live_pid "$(nginx_pidfile)" "$(nginx_marker)")" && [[ -n "$holder" ]] &&
        { [[ "${holder%%/*}" == "$pid" ]] || [[ "$(ps -o ppid= -p "${holder%%/*}" 2>/dev/null | tr -d ' ')" == "$pid" ]]; }; then
        echo ours
        return
    fi
    echo "$holder"
}

# Fills GPU_LINE[index] with "util mem_used mem_total temp power" from nvidia-smi.
read_gpu_stats() {
    GPU_LINE=()
    have nvidia-smi || return 0
    local idx util used total temp power
    while IFS=', ' read -r idx util used total temp power; do
        [[ "$idx" =~ ^[0-9]+$ ]] && GPU_LINE[idx]="$util $used $total $temp $power"
    done < <(nvidia-smi --query-gpu=index,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw \
        --format=csv,noheader,nounits 2>/dev/null || true)
}

num_or_dash() { if [[ "$1" =~ ^[0-9]+([.][0-9]+)?$ ]]; then echo "$1"; else echo "-"; fi; }

# One screen. Sets UNHEALTHY to the number of problems found and TOTAL_COMPLETED.
render() {
    local -a fields
    local g i port state stats util nginx used total temp power queued running completed failed spi last_min
    local ready=0 sum_queued=0 sum_running=0 sum_completed=0 sum_failed=0 capacity=0 per_min=0 rate_known=0
    UNHEALTHY=0
    read_gpu_stats
    banner "FLUX multi-GPU monitor  $(date '+%F %T')  ($NUM_GPUS workers on ports ${PORTS[*]})"
    echo
    printf '%-4s %-6s %-16s %-6s %-7s\n' GPU UTIL "MEMORY MiB" TEMP POWER
    for g in "${GPUS[@]}"; do
        if [[ -n "${GPU_LINE[g]:-}" ]]; then
            read -r util used total temp power <<<"${GPU_LINE[g]}"
            printf '%-4s %-6s %-16s %-6s %-7s\n' "$g" "${util}%" "$used/$total" "${temp}C" "${power%.*}W"
        else
            printf '%-4s %-6s %-16s %-6s %-7s\n' "$g" n/a n/a n/a n/a
        fi
    done
    echo
    printf '%-4s %-6s %-9s %-7s %-8s %-10s %-7s %-8s\n' GPU PORT STATE QUEUED RUNNING COMPLETED FAILED S/IMAGE
    for ((i = 0; i < NUM_GPUS; i++)); do
        port="${PORTS[i]}" g="${GPUS[i]}"
        state="$(worker_state "$port" | clean)"
        queued="-" running="-" completed="-" failed="-" spi="-"
        if [[ "$state" != down ]]; then
            http_get "http://$(probe_host):$port/queue-stats" 2
            stats="$HTTP_BODY"
            mapfile -t fields < <(json_get "$stats" queued running completed failed seconds_per_image images_last_minute)
            queued="$(num_or_dash "${fields[0]:-}")"
            running="$(num_or_dash "${fields[1]:-}")"
            completed="$(num_or_dash "${fields[2]:-}")"
            failed="$(num_or_dash "${fields[3]:-}")"
            spi="$(num_or_dash "${fields[4]:-}")"
            last_min="${fields[5]:-}"
            [[ "$last_min" =~ ^[0-9]+$ ]] && { per_min=$((per_min + last_min)); rate_known=1; }
        fi
        if [[ "$state" == ready ]]; then
            ready=$((ready + 1))
            printf '%-4s %-6s %s%-9s%s' "$g" "$port" "$C_GREEN" "$state" "$C_RESET"
        else
            UNHEALTHY=$((UNHEALTHY + 1))
            printf '%-4s %-6s %s%-9s%s' "$g" "$port" "$C_RED" "$state" "$C_RESET"
        fi
        printf ' %-7s %-8s %-10s %-7s %-8s\n' "$queued" "$running" "$completed" "$failed" "$spi"
        [[ "$queued" =~ ^[0-9]+$ ]] && sum_queued=$((sum_queued + queued))
        [[ "$running" =~ ^[0-9]+$ ]] && sum_running=$((sum_running + running))
        [[ "$completed" =~ ^[0-9]+$ ]] && sum_completed=$((sum_completed + completed))
        [[ "$failed" =~ ^[0-9]+$ ]] && sum_failed=$((sum_failed + failed))
        [[ "$spi" =~ ^[0-9.]+$ ]] && capacity="$(awk -v c="$capacity" -v s="$spi" 'BEGIN { if (s > 0) c += 60 / s; print c }')"
    done
    echo
    nginx="$(nginx_probe | clean)"
    if [[ "$nginx" == ours ]]; then
        printf 'nginx: %sup%s on port %s\n' "$C_GREEN" "$C_RESET" "$NGINX_PORT"
    elif [[ -n "$nginx" ]]; then
        printf 'nginx: %snot ours%s: port %s is held by %s, which is not this installation'"'"'s nginx\n' \
            "$C_RED" "$C_RESET" "$NGINX_PORT" "$nginx"
        UNHEALTHY=$((UNHEALTHY + 1))
    elif [[ "$NGINX_EXPECTED" == none ]]; then
        printf 'nginx: not used (direct access to the workers)\n'
    else
        printf 'nginx: %sdown%s (port %s)\n' "$C_RED" "$C_RESET" "$NGINX_PORT"
        UNHEALTHY=$((UNHEALTHY + 1))
    fi
    # images generated in the last 60 s, as the workers count them (one sample is enough: --once, cron)
    local rate="-"
    [[ "$rate_known" == 1 ]] && rate="$per_min"
    printf 'TOTAL: %d/%d ready  queued %d  running %d  completed %d  failed %d  rate %s images/min  capacity %.0f images/min\n' \
        "$ready" "$NUM_GPUS" "$sum_queued" "$sum_running" "$sum_completed" "$sum_failed" "$rate" "$capacity"
    if [[ "$SHOW_ERRORS" == 1 ]]; then show_errors; fi
}

# Log levels and Python failures; case-sensitive so the logger name "uvicorn.error" is no hit.
# Anchored to where the worker's log puts them (api/logs.py: "<date> <time> LEVEL logger: message", then a
# traceback's own lines): client-supplied text sits escaped inside a message, so a request path saying
# "ERROR" or "Traceback" is never read as one.
ERROR_PATTERN='^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:,.]+ (ERROR|CRITICAL) |^Traceback |^[A-Za-z_][A-Za-z0-9_.]*(Error|Exception)(:|$)|^Fatal Python error|^Killed'

# The current run of a log starts at its last "=== <date> start GPU ..." line (written by every entry point
# that starts a worker). Its errors are shown; earlier runs' only with --all-errors, each marked.
show_errors() {
    local i log lines old_lines start old_count
    echo
    banner "Recent errors (last ${ERROR_LINES:-5} per log, this run$( ((ALL_ERRORS)) && echo ' and earlier runs'))"
    for ((i = 0; i < NUM_GPUS; i++)); do
        log="${LOGS[i]:-}"
        [[ -n "$log" ]] || log="$LOG_DIR/flux_gpu${GPUS[i]}_port${PORTS[i]}.log"
        if [[ ! -f "$log" ]]; then
            echo "GPU ${GPUS[i]}: no log at $log" | clean
            continue
        fi
        start="$(grep -an '^=== .* start GPU ' "$log" | tail -n 1 | cut -d: -f1)"
        start="${start:-0}"
        lines="$(grep -anE "$ERROR_PATTERN" "$log" | awk -F: -v s="$start" '$1 > s' | cut -d: -f2- |
            tail -n "${ERROR_LINES:-5}" || true)"
        old_lines="$(grep -anE "$ERROR_PATTERN" "$log" | awk -F: -v s="$start" '$1 < s' | cut -d: -f2- || true)"
        old_count=0
        [[ -n "$old_lines" ]] && old_count="$(wc -l <<<"$old_lines")"
        if [[ -z "$lines" ]]; then
            echo "GPU ${GPUS[i]}: no errors in this run ($log)" | clean
        else
            echo "GPU ${GPUS[i]}: $log" | clean
            printf '%s\n' "$lines" | clean | sed 's/^/    /'
        fi
        if ((old_count > 0)); then
            if ((ALL_ERRORS)); then
                printf '%s\n' "$old_lines" | tail -n "${ERROR_LINES:-5}" | clean | sed 's/^/    [earlier run] /'
            else
                echo "    ($old_count error lines from earlier runs: --all-errors shows them)"
            fi
        fi
    done
}

# The fleet's view: start_multi_gpu.sh's status -f (exit 0 all ready, else 1), once or refreshed.
monitor_fleet() {
    local once="$1" interval="$2" rc=0
    local -a cmd=("$FLUX_PROJECT_DIR/start_multi_gpu.sh" status -f "$FLEET_FILE")
    ((SHOW_ERRORS == 0)) || warn "--errors: worker logs stay on their hosts (./monitor_multi_gpu.sh --errors there)"
    if ((once)); then
        "${cmd[@]}" 2>&1 | clean || rc=$?
        ((rc == 0)) || exit 1
        exit 0
    fi
    SCREEN_FILE="$(mktemp)"
    trap 'rm -f "$SCREEN_FILE"; echo; exit 0' INT TERM
    while :; do
        "${cmd[@]}" >"$SCREEN_FILE" 2>&1 || true
        if [[ -t 1 ]]; then printf '\e[H\e[2J'; fi
        clean <"$SCREEN_FILE"
        printf '(refreshing every %ss, Ctrl-C to quit)\n' "$interval"
        sleep "$interval"
    done
}

main() {
    local once=0 interval=2
    FLEET_FILE=""
    SHOW_ERRORS=0 ALL_ERRORS=0
    while (($# > 0)); do
        case "$1" in
            --once) once=1 ;;
            --errors) SHOW_ERRORS=1 ;;
            --all-errors) SHOW_ERRORS=1; ALL_ERRORS=1 ;;
            --interval) interval="${2:?--interval needs seconds}"; shift ;;
            -f | --fleet) FLEET_FILE="${2:?-f needs an inventory file}"; shift ;;
            -h | --help) usage; exit 0 ;;
            *) error "unknown argument '$1'"; usage >&2; exit 2 ;;
        esac
        shift
    done
    [[ "$interval" =~ ^([0-9]+[.]?[0-9]*|[.][0-9]+)$ && ! "$interval" =~ ^[0.]+$ ]] ||
        fatal "--interval needs a number of seconds above 0, got '$interval'"
    if [[ -n "$FLEET_FILE" ]]; then monitor_fleet "$once" "$interval"; fi
    resolve_targets
    if ((once)); then
        render
        ((UNHEALTHY == 0)) || exit 1
        exit 0
    fi
    # Render into a file, then swap the screen at once (no flicker while workers answer).
    SCREEN_FILE="$(mktemp)"
    trap 'rm -f "$SCREEN_FILE"; echo; exit 0' INT TERM
    while :; do
        render >"$SCREEN_FILE"
        if [[ -t 1 ]]; then printf '\e[H\e[2J'; fi
        cat "$SCREEN_FILE"
        printf '(refreshing every %ss, Ctrl-C to quit)\n' "$interval"
        sleep "$interval"
    done
}

main "$@"
