#!/usr/bin/env bash
# Create ./.venv (if missing) and install a requirements file into it.
#
# Usage: scripts/setup_venv.sh [REQUIREMENTS_FILE]        (default: requirements.txt)
#
# Environment:
#   FLUX_TORCH_SPEC  torch to install before the requirements. Default: on a machine without
#                    nvidia-smi, torch==2.13.0 (the CPU build the demo and the tests run on);
#                    with GPUs, nothing: requirements.txt's torch>=2.6 takes PyPI's CUDA build.
#                    Set it to "" to skip, or to e.g. "torch==2.11.0" to pin another build.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
req="${1:-$root/requirements.txt}"
venv="$root/.venv"

if [[ -z "${FLUX_TORCH_SPEC+set}" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1; then FLUX_TORCH_SPEC=""; else FLUX_TORCH_SPEC="torch==2.13.0"; fi
fi

if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv" || { echo "python3 -m venv failed (apt-get install python3-venv?)" >&2; exit 1; }
    "$venv/bin/python" -m pip install -q --upgrade pip
fi
if [[ -n "$FLUX_TORCH_SPEC" ]] && ! "$venv/bin/python" -c 'import torch' >/dev/null 2>&1; then
    "$venv/bin/python" -m pip install "$FLUX_TORCH_SPEC"
fi
"$venv/bin/python" -m pip install -r "$req"
