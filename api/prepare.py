"""Compile once for a fleet: `python -m api.prepare PRECISION` (what `./start_multi_gpu.sh prepare` runs).

Loads the model the workers would load, with their settings (FLUX_* environment, one Settings object), runs
their warm-up, which compiles every graph into FLUX_COMPILE_CACHE_DIR, writes the portable artifacts file
beside it (torch.compiler.save_cache_artifacts) and the warm-up timings, and exits. Workers started later with
the same cache folder (or a copy of it, e.g. baked into a Docker image) warm up from the cache instead of
compiling, all at once. Without a GPU nothing is compiled (compile is GPU-only): the warm-up still runs and
its timings are recorded, and the command says so. The batch warmed up is FLUX_MAX_CONCURRENT's (a value
pinned in code in api/<precision>_routes.py is not seen here; the worker then compiles that batch at start).
"""
from __future__ import annotations

import logging
import sys
import time

from pydantic import ValidationError

from api.app import build_engine
from api.server import configure_logging
from api.settings import describe_invalid, load_settings

log = logging.getLogger("flux.prepare")


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("bf16", "fp4", "fp8"):
        print("usage: python -m api.prepare bf16|fp4|fp8", file=sys.stderr)
        return 2
    try:
        settings = load_settings(argv[0])
    except ValidationError as exc:
        print(describe_invalid(exc, argv[0]), file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    started = time.perf_counter()
    engine = build_engine(settings)
    engine.config.warmup_batch = settings.max_concurrent
    info = engine.load()
    warm = engine.warmup()
    artifacts = engine.save_compile_artifacts() if info.compiled else None
    total = time.perf_counter() - started
    if info.compiled:
        print(f"prepared {settings.model} ({info.precision}) on {info.device_name} in {total:.0f} s "
              f"(warm-up {warm:.0f} s): cache {settings.compile_cache_dir}"
              + (f", artifacts {artifacts}" if artifacts else ", no portable artifacts written"), flush=True)
    else:
        why = "compile is off (FLUX_COMPILE=0)" if not settings.compile else "compile is GPU-only"
        print(f"nothing compiled for {settings.model} ({info.precision}) on {info.device_name}: {why}; "
              f"warm-up timings recorded in {settings.compile_cache_dir} ({warm:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
