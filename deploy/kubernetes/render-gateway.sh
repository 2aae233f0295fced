#!/usr/bin/env bash
# Re-render the gateway's nginx.conf of a kustomize overlay from its worker StatefulSets.
#
#   deploy/kubernetes/render-gateway.sh OVERLAY [NAMESPACE]     e.g. mixed, or mixed flux-prod
#   deploy/kubernetes/render-gateway.sh --workers OVERLAY [NS]  only print the workers (JSON)
#   deploy/kubernetes/render-gateway.sh --print OVERLAY [NS]    print the config instead of replacing it
#
# The workers (stable pod DNS names, port, precision, worker id) come from `kubectl kustomize` of the
# overlay, so replicas, set names and the namespace are edited in one place, the manifests; the config
# comes from the project's renderer, scripts/render_nginx.py, the one that renders the single-host and the
# fleet configs (--workers-file, --listen 8080, the cluster DNS as --resolver so pod names are re-resolved,
# pid and temp files in /tmp). The result replaces the overlay's nginx.conf (or the base's gateway/nginx.conf
# for overlays without one); commit it, and `kubectl apply -k` rolls the gateway (the ConfigMap's name carries
# a hash of its content).
# FLUX_RATE_LIMIT=10r/s adds the per-address rate limit (API keys never go into a ConfigMap); RESOLVER
# overrides the cluster DNS name.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

workers_only=0 print_only=0
if [[ "${1:-}" == "--workers" ]]; then
    workers_only=1
    shift
elif [[ "${1:-}" == "--print" ]]; then
    print_only=1
    shift
fi
if [[ $# -lt 1 || $# -gt 2 || "$1" == -* ]]; then
    sed -n '2,16p' "${BASH_SOURCE[0]}" >&2
    exit 2
fi
overlay="$1"
namespace="${2:-}"
if [[ "$overlay" == base ]]; then
    dir="$here/base"
else
    dir="$here/overlays/$overlay"
fi
[[ -f "$dir/kustomization.yaml" ]] || { echo "no overlay $overlay ($dir/kustomization.yaml)" >&2; exit 2; }

python="${FLUX_PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
kubectl="${KUBECTL:-}"
if [[ -z "$kubectl" ]]; then
    if [[ -x "$root/.venv/bin/kubectl" ]]; then kubectl="$root/.venv/bin/kubectl"; else kubectl=kubectl; fi
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
ns_args=()
[[ -n "$namespace" ]] && ns_args=(--namespace "$namespace")
"$kubectl" kustomize "$dir" | "$python" "$here/gateway_workers.py" "${ns_args[@]}" > "$tmp/workers.json"
if ((workers_only)); then
    cat "$tmp/workers.json"
    exit 0
fi

if [[ -f "$dir/nginx.conf" ]]; then target="$dir/nginx.conf"; else target="$here/gateway/nginx.conf"; fi
render_args=(--workers-file "$tmp/workers.json" --listen 8080 --no-api-keys --headers-more off
    --resolver "${RESOLVER:-kube-dns.kube-system.svc.cluster.local valid=10s ipv6=off}"
    --pid /tmp/nginx.pid --temp-dir /tmp)
[[ -z "${FLUX_RATE_LIMIT:-}" ]] || render_args+=(--rate "$FLUX_RATE_LIMIT")
(cd "$root" && "$python" scripts/render_nginx.py "${render_args[@]}" --out "$tmp/nginx.conf")
[[ -s "$tmp/nginx.conf" ]] || { echo "the renderer wrote nothing" >&2; exit 1; }
if ((print_only)); then
    cat "$tmp/nginx.conf"
    exit 0
fi
mv "$tmp/nginx.conf" "$target"
echo "wrote $target for $(grep -c '"host"' "$tmp/workers.json") workers" >&2
