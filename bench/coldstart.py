"""Cold and warm start of one engine, as a worker does it: load, the engine's own warm-up (each item timed),
the compiler's time breakdown, optional portable compile artifacts, then timed calls.

    python -m bench.coldstart --precision fp8 --compile --cache-dir /tmp/c --case 1024x1024:28 --save-artifacts
    TORCH_LOGS=recompiles,graph_breaks python -m bench.coldstart ...   # why a warm-up compiles more than once

Run it twice with the same --cache-dir for the warm restart; point a fresh --cache-dir at a copied
artifacts-*.bin for the portable path. Prints one JSON line last (and --json FILE).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dummy:flux.1-dev")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp4", "fp8"))
    p.add_argument("--compile", action="store_true")
    p.add_argument("--cache-dir", default=None, help="compile cache folder (FLUX_COMPILE_CACHE_DIR)")
    p.add_argument("--warmup-sizes", default="auto", help="WxH,...; auto: the engine's default")
    p.add_argument("--warmup-batch", type=int, default=2, help="the queue's max_concurrent (default 2)")
    p.add_argument("--engine-opt", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--case", action="append", default=[], help="WxH:STEPS timed after the warm-up")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--save-artifacts", action="store_true", help="write the portable compile artifacts")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    t_start = time.perf_counter()
    import torch

    from bench.raw import _coerce
    from models.flux import EngineConfig, FluxEngine, ImageSpec

    sizes = None
    if args.warmup_sizes != "auto":
        sizes = [tuple(int(x) for x in s.lower().split("x")) for s in args.warmup_sizes.split(",") if s]
    config = EngineConfig(model=args.model, precision=args.precision, device=args.device, compile=args.compile,
                          compile_cache_dir=args.cache_dir, warmup_sizes=sizes, warmup_batch=args.warmup_batch)
    for opt in args.engine_opt:
        key, _, value = opt.partition("=")
        setattr(config, key, _coerce(value))
    engine = FluxEngine(config)
    info = engine.load()
    load_s = time.perf_counter() - t_start
    print(f"loaded in {load_s:.1f} s (process start included): {info.precision} on {info.device_name}", flush=True)
    warm_s = engine.warmup()
    prog = engine.progress()
    print(f"warm-up {warm_s:.1f} s: {prog.get('items_s')}", flush=True)
    result = {"model": args.model, "precision": info.precision, "compiled": info.compiled,
              "engine": {k: getattr(config, k) for k in ("compile_dynamic", "compile_vae", "compile_mode")},
              "device": info.device_name, "torch": torch.__version__, "load_s": round(load_s, 1),
              "warmup_s": round(warm_s, 1), "warmup_items_s": prog.get("items_s"),
              "ready_s": round(time.perf_counter() - t_start, 1)}
    try:
        from torch._dynamo.utils import compile_times, counters

        result["dynamo_stats"] = {k: dict(v) for k, v in counters.items() if k in ("stats", "recompiles", "aot_autograd",
                                                                                  "inductor")}
        ct = compile_times(repr="csv", aggregate=True)
        result["compile_times"] = {name: round(float(t), 1) for name, t in zip(ct[0], ct[1])} \
            if isinstance(ct, tuple) else str(ct)[:2000]
        print("compile times (s, aggregate):", json.dumps(result["compile_times"]), flush=True)
    except Exception as exc:  # the breakdown is a diagnostic; its API moves between torch releases
        print(f"no compile-time breakdown: {exc}", flush=True)
    if args.save_artifacts:
        t0 = time.perf_counter()
        result["artifacts"] = engine.save_compile_artifacts()
        result["artifacts_save_s"] = round(time.perf_counter() - t0, 1)
    cuda = info.device.startswith("cuda")
    for case in args.case:
        size, _, steps = case.partition(":")
        w, _, h = size.partition("x")
        spec = lambda i: ImageSpec(prompt=f"timed prompt {i} {time.time()}", seed=i, width=int(w), height=int(h),  # noqa: E731
                                   steps=int(steps or info.default_steps), guidance=info.default_guidance)
        times = []
        for i in range(args.repeats):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.generate([spec(i)])
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        result.setdefault("cases", {})[case] = {"median_s": round(statistics.median(times), 4),
                                                "times": [round(t, 4) for t in times]}
        print(f"{case}: median {statistics.median(times):.4f} s {['%.4f' % t for t in times]}", flush=True)
    if cuda:
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["resident_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        result["reserved_gib"] = round(torch.cuda.memory_reserved() / 2**30, 2)
    line = json.dumps(result)
    print("RESULT " + line, flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
