"""What LoRA adapters cost on a GPU: first use, a switch between cached adapters, and the per-image cost.

    python -m bench.lora                                  # dummy:flux.1-dev, bf16, compiled, 1024², 28 steps
    python -m bench.lora --precision fp8 --ranks 16,64 --runs 3 --json bench/results/lora.json
    python -m bench.lora --smoke                          # dummy:tiny on the CPU: checks the program, not speed

The engine is the worker's own (models/flux.py with LoRA slots, models/lora.py), loaded with FLUX_LORA_MAX_RANK
set to the largest rank measured. The adapters are synthetic, made with PEFT for the model's transformer
(bench/lora_files.py: attention, MLP and single-block projections of every block), one per rank and run, so
every "first use" really reads and converts a file. For each rank it measures (medians, seconds):

  base_s          one image without adapters (the same run without LoRA)
  first_use_s     putting an adapter not seen before into a slot: read, convert, copy to the device, hot-swap
  switch_s        switching the slot between two adapters already in the device cache (a device copy)
  image_s         one image with the adapter active; image_s - base_s is the per-image cost of the LoRA math
  compiles_after_ready   torch.compile compilations after warm-up: 0 means no request ever recompiled
"""
from __future__ import annotations

import sys

if not __package__:
    sys.exit("run it from the repository root as: python -m bench.lora ...")

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import run_header, write_result


def _sync(engine) -> None:
    import torch

    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def _timed(engine, fn) -> float:
    _sync(engine)
    started = time.perf_counter()
    fn()
    _sync(engine)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lora", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dummy:flux.1-dev")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp8"))
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--ranks", default="16,64", help="comma-separated adapter ranks (default %(default)s)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="measure the uncompiled transformer")
    p.add_argument("--smoke", action="store_true", help="dummy:tiny on the CPU, 256², 2 steps, ranks 4,8, 1 run")
    p.add_argument("--json", help="exact path of the JSON result")
    p.add_argument("--out-dir", help="folder of the JSON result (default bench/results)")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.size, args.steps, args.ranks, args.runs = "dummy:tiny", 256, 2, "4,8", 1
    ranks = [int(r) for r in args.ranks.split(",") if r.strip()]

    import torch

    from bench.lora_files import WIDE_TARGETS, peft_adapter
    from models.flux import EngineConfig, FluxEngine, ImageSpec

    result = run_header("bench.lora", "lora", "bench.lora", argv if argv is not None else sys.argv[1:])
    folder = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    device = "cpu" if args.smoke else "auto"
    config = EngineConfig(model=args.model, precision=args.precision, device=device, compile=not args.no_compile,
                          warmup_sizes=((args.size, args.size),), warmup_steps=1 if args.smoke else 2,
                          lora_dir=str(folder), lora_max_rank=max(ranks), lora_slots=1, lora_cache=4)
    engine = FluxEngine(config)
    started = time.perf_counter()
    info = engine.load()
    load_s = time.perf_counter() - started
    warmup_s = engine.warmup()
    card = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu"
    slots = engine.loras
    slot_gib = sum(t.numel() * t.element_size() for n, t in engine.pipe.transformer.named_parameters()
                   if ".lora_" in n) / 2**30
    result.update({"card": card, "config": {"model": args.model, "precision": info.precision, "size": args.size,
                                            "steps": args.steps, "ranks": ranks, "runs": args.runs,
                                            "compiled": info.compiled, "targets": list(WIDE_TARGETS)},
                   "load_s": round(load_s, 2), "warmup_s": round(warmup_s, 2),
                   "slot_memory_gib": round(slot_gib, 3), "results": [], "errors": []})
    print(f"{args.model} {info.precision} on {card}; compiled={info.compiled}; {args.size}² x {args.steps} steps; "
          f"one slot at rank {max(ranks)}: {slot_gib:.2f} GiB")

    spec = ImageSpec(prompt="a lighthouse on a cliff at dusk", seed=1, width=args.size, height=args.size,
                     steps=args.steps, guidance=info.default_guidance)
    engine.generate([spec])  # the prompt's embeddings cached, as for a repeated prompt
    base = [_timed(engine, lambda: engine.generate([spec])) for _ in range(args.runs)]
    base_s = statistics.median(base)
    print(f"{'rank':>5s} {'base_s':>9s} {'first_use_s':>12s} {'switch_s':>9s} {'image_s':>9s} {'lora_cost_s':>12s}")
    for rank in ranks:
        names = [f"r{rank}-{i}" for i in range(args.runs + 2)]
        for i, name in enumerate(names):
            peft_adapter(engine.pipe.transformer, folder / f"{name}.safetensors", rank=rank, seed=rank * 100 + i,
                         std=0.02, targets=WIDE_TARGETS, dtype=torch.bfloat16)
        first = [_timed(engine, lambda n=n: slots.apply(((n, 1.0),))) for n in names[2:]]
        a, b = names[:2]
        slots.apply(((a, 1.0),))
        slots.apply(((b, 1.0),))  # both in the device cache now
        switch = [_timed(engine, lambda n=n: slots.apply(((n, 1.0),))) for _ in range(args.runs) for n in (a, b)]
        styled = dataclasses.replace(spec, loras=((b, 1.0),))
        image = [_timed(engine, lambda: engine.generate([styled])) for _ in range(args.runs)]
        slots.apply(())
        row = {"rank": rank, "base_s": round(base_s, 4), "first_use_s": round(statistics.median(first), 4),
               "switch_s": round(statistics.median(switch), 4), "image_s": round(statistics.median(image), 4)}
        row["lora_cost_s"] = round(row["image_s"] - base_s, 4)
        row["lora_cost_pct"] = round(100 * row["lora_cost_s"] / base_s, 1) if base_s else None
        result["results"].append(row)
        print(f"{rank:5d} {row['base_s']:9.3f} {row['first_use_s']:12.3f} {row['switch_s']:9.4f} "
              f"{row['image_s']:9.3f} {row['lora_cost_s']:12.3f}")
    stats = engine.lora_stats()
    result["compiles_after_ready"] = stats["compiles_after_ready"]
    result["lora_stats"] = stats
    print(f"compiles after warm-up: {stats['compiles_after_ready']}")
    print(f"\nresult: {write_result(result, args.out_dir, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
