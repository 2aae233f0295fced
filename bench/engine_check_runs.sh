#!/bin/bash
# Quick per-configuration engine timings (one process per configuration), as run for docs/BENCHMARKS.md:
#   bash bench/engine_check_runs.sh fp4 fp4c bf16cu bf16cf fp8cs   (names: see the if-lines of bench/engine_check.py)
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site || exit
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind
for cfg in "$@"; do
  echo "=== $cfg" | tee -a "$OUT/all.log"
  timeout "${PER:-240}" python3 bench/engine_check.py "$cfg" >> "$OUT/all.log" 2>&1
  grep -E "^(bf16|fp4|fp8) " "$OUT/all.log" | tail -1
  python3 -c "import json;d=json.load(open('/tmp/check.json'));print(json.dumps(d))" >> "$OUT/results.jsonl" 2>/dev/null
done
grep -E "Error|error:" "$OUT/all.log" | grep -v Warning | tail -8
