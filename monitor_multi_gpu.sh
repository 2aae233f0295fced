#!/usr/bin/env bash
# Live view of the FLUX workers started by start_multi_gpu.sh: GPUs, queues, health, nginx.
#
# Usage: ./monitor_multi_gpu.sh [--once] [--errors] [--interval SECONDS]
#   (none)         refresh every 2 s until Ctrl-C
#   --once         print once; exit 1 when any worker is not ready or nginx is down (cron, CI)
#   --errors       also show the last error lines of every worker log
#   --interval N   seconds between refreshes (default 2)
#
# Which workers: the set start_multi_gpu.sh recorded in run/state; without it, NUM_GPUS workers
# from BASE_PORT (the same defaults as start_multi_gpu.sh).
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

resolve_targets() {
    load_paths
    [[ -n "$NUM_GPUS" ]] || NUM_GPUS="$(state_get NUM_WORKERS 2>/dev/null || true)"   # -g groups GPUs
    [[ -n "$NUM_GPUS" ]] || NUM_GPUS="$(state_get NUM_GPUS 2>/dev/null || true)"
    [[ -n "$NUM_GPUS" ]] || NUM_GPUS="$(detect_gpu_count)"
    [[ -n "$BASE_PORT" ]] || BASE_PORT="$(state_get BASE_PORT 2>/dev/null || true)"
    [[ -n "$BASE_PORT" ]] || BASE_PORT=8000
    [[ -n "$NGINX_PORT" ]] || NGINX_PORT="$(state_get NGINX_PORT 2>/dev/null || true)"
    [[ -n "$NGINX_PORT" ]] || NGINX_PORT=80
    NGINX_EXPECTED="$(state_get NGINX 2>/dev/null || true)"
    [[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]] || fatal "NUM_GPUS must be a positive number, got '$NUM_GPUS'"
    [[ "$BASE_PORT" =~ ^[0-9]+$ ]] || fatal "BASE_PORT must be a number, got '$BASE_PORT'"
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

num_or_dash() { if [[ -n "$1" && "$1" != null ]]; then echo "$1"; else echo "-"; fi; }

# One screen. Sets UNHEALTHY to the number of problems found and TOTAL_COMPLETED.
render() {
    local i port state stats util used total temp power queued running completed failed spi last_min
    local ready=0 sum_queued=0 sum_running=0 sum_completed=0 sum_failed=0 capacity=0 per_min=0 rate_known=0
    UNHEALTHY=0
    read_gpu_stats
    banner "FLUX multi-GPU monitor  $(date '+%F %T')  ($NUM_GPUS workers from port $BASE_PORT)"
    echo
    printf '%-4s %-6s %-16s %-6s %-7s\n' GPU UTIL "MEMORY MiB" TEMP POWER
    for ((i = 0; i < NUM_GPUS; i++)); do
        if [[ -n "${GPU_LINE[i]:-}" ]]; then
            read -r util used total temp power <<<"${GPU_LINE[i]}"
            printf '%-4s %-6s %-16s %-6s %-7s\n' "$i" "${util}%" "$used/$total" "${temp}C" "${power%.*}W"
        else
            printf '%-4s %-6s %-16s %-6s %-7s\n' "$i" n/a n/a n/a n/a
        fi
    done
    echo
    printf '%-4s %-6s %-9s %-7s %-8s %-10s %-7s %-8s\n' GPU PORT STATE QUEUED RUNNING COMPLETED FAILED S/IMAGE
    for ((i = 0; i < NUM_GPUS; i++)); do
        port=$((BASE_PORT + i))
        state="$(worker_state "$port")"
        queued="-" running="-" completed="-" failed="-" spi="-"
        if [[ "$state" != down ]]; then
            http_get "http://127.0.0.1:$port/queue-stats" 2
            stats="$HTTP_BODY"
            queued="$(num_or_dash "$(json_field queued "$stats")")"
            running="$(num_or_dash "$(json_field running "$stats")")"
            completed="$(num_or_dash "$(json_field completed "$stats")")"
            failed="$(num_or_dash "$(json_field failed "$stats")")"
            spi="$(num_or_dash "$(json_field seconds_per_image "$stats")")"
            last_min="$(json_field images_last_minute "$stats")"
            [[ "$last_min" =~ ^[0-9]+$ ]] && { per_min=$((per_min + last_min)); rate_known=1; }
        fi
        if [[ "$state" == ready ]]; then
            ready=$((ready + 1))
            printf '%-4s %-6s %s%-9s%s' "$i" "$port" "$C_GREEN" "$state" "$C_RESET"
        else
            UNHEALTHY=$((UNHEALTHY + 1))
            printf '%-4s %-6s %s%-9s%s' "$i" "$port" "$C_RED" "$state" "$C_RESET"
        fi
        printf ' %-7s %-8s %-10s %-7s %-8s\n' "$queued" "$running" "$completed" "$failed" "$spi"
        [[ "$queued" =~ ^[0-9]+$ ]] && sum_queued=$((sum_queued + queued))
        [[ "$running" =~ ^[0-9]+$ ]] && sum_running=$((sum_running + running))
        [[ "$completed" =~ ^[0-9]+$ ]] && sum_completed=$((sum_completed + completed))
        [[ "$failed" =~ ^[0-9]+$ ]] && sum_failed=$((sum_failed + failed))
        [[ "$spi" =~ ^[0-9.]+$ ]] && capacity="$(awk -v c="$capacity" -v s="$spi" 'BEGIN { if (s > 0) c += 60 / s; print c }')"
    done
    echo
    if port_in_use "$NGINX_PORT"; then
        printf 'nginx: %sup%s on port %s\n' "$C_GREEN" "$C_RESET" "$NGINX_PORT"
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
ERROR_PATTERN='\b(ERROR|CRITICAL|FATAL)\b|Traceback|[A-Za-z]+(Error|Exception):|out of memory|Killed'

show_errors() {
    local i log lines line
    echo
    banner "Recent errors (last ${ERROR_LINES:-5} per log)"
    for ((i = 0; i < NUM_GPUS; i++)); do
        log="$LOG_DIR/flux_gpu${i}_port$((BASE_PORT + i)).log"
        if [[ ! -f "$log" ]]; then
            echo "GPU $i: no log at $log"
            continue
        fi
        lines="$(grep -aE "$ERROR_PATTERN" "$log" | tail -n "${ERROR_LINES:-5}" || true)"
        if [[ -z "$lines" ]]; then
            echo "GPU $i: no errors ($log)"
        else
            echo "GPU $i: $log"
            while IFS= read -r line; do printf '    %s\n' "$line"; done <<<"$lines"
        fi
    done
}

main() {
    local once=0 interval=2
    SHOW_ERRORS=0
    while (($# > 0)); do
        case "$1" in
            --once) once=1 ;;
            --errors) SHOW_ERRORS=1 ;;
            --interval) interval="${2:?--interval needs seconds}"; shift ;;
            -h | --help) usage; exit 0 ;;
            *) error "unknown argument '$1'"; usage >&2; exit 2 ;;
        esac
        shift
    done
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
