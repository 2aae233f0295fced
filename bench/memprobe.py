"""Where a worker's device memory goes: torch's allocated and reserved bytes against what the card reports in
use (NVML), after load, after the warm-up, after a 1024²/28 image, and after releasing the allocator's cache.

    python -m bench.memprobe --precision fp4 --cache-dir /tmp/c4 [--warmup-batch 1] [--no-compile]

The gap between NVML's figure and torch's reserved bytes is the CUDA context, cuBLAS/cuDNN workspaces and
compiled kernels' modules; reserved minus allocated is the caching allocator's free blocks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def snapshot(torch, label: str) -> dict:
    free, total = torch.cuda.mem_get_info()
    row = {"label": label, "allocated_gib": round(torch.cuda.memory_allocated() / 2**30, 2),
           "reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 2),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
           "device_used_gib": round((total - free) / 2**30, 2)}
    print("mem " + json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="dummy:flux.1-dev")
    p.add_argument("--precision", default="fp4")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--warmup-batch", type=int, default=2)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)
    import torch

    from models.flux import EngineConfig, FluxEngine, ImageSpec

    if not torch.cuda.is_available():
        print("memprobe needs a CUDA device", file=sys.stderr)
        return 2
    engine = FluxEngine(EngineConfig(model=args.model, precision=args.precision, compile=not args.no_compile,
                                     compile_cache_dir=args.cache_dir, warmup_batch=args.warmup_batch))
    engine.load()
    rows = [snapshot(torch, "loaded")]
    engine.warmup()
    rows.append(snapshot(torch, f"warm-up done (batch {args.warmup_batch})"))
    torch.cuda.empty_cache()
    rows.append(snapshot(torch, "after empty_cache"))
    torch.cuda.reset_peak_memory_stats()
    engine.generate([ImageSpec("a probe", 1, 1024, 1024, 28, engine.info.default_guidance)])
    rows.append(snapshot(torch, "after one 1024²/28 image"))
    torch.cuda.empty_cache()
    rows.append(snapshot(torch, "after empty_cache"))
    print("RESULT " + json.dumps({"precision": args.precision, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                                  "rows": rows}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
