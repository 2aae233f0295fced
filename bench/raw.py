"""Raw mode: the pipeline in-process, timed around FluxEngine.generate — the ceiling for the HTTP stack.

    python -m bench.raw --model dummy:flux.1-dev --precision bf16 --case 1024x1024:28:1 --case 512x512:28:4
    python -m bench.raw --model dummy:flux.1-dev --compile --case 1024x1024:28 --profile
    python -m bench.raw --smoke            # dummy:tiny on the CPU, a few seconds (CI)

A case is WIDTHxHEIGHT[:STEPS[:BATCH]]; --sizes/--steps/--batch-sizes give their cross product instead.
For each case: warm-up calls (the first is reported as warmup_s: it holds compilation and allocator growth;
shapes do not depend on the step count, so warm-ups run --warmup-steps steps), then --repeats timed calls
with torch.cuda.synchronize() on both sides; the median is the figure. Every call uses new prompts, so the
text encoders run as they do for a stream of new requests (--same-prompt measures the cached path).

Figures: seconds per call and per image, images/s, achieved TFLOP/s of the transformer (bench/flops.py) and
its share of the bf16 matrix rate, the FLOP-limited time per image, load and warm-up time, resident
(after load) and peak memory from torch and from NVML. --profile adds where one call's time goes.
The table is printed last; the JSON goes to bench/results/<name>-<stamp>.json (or --out-dir, --json).
"""
from __future__ import annotations

import sys

if not __package__:  # `python bench/raw.py` would miss the repository root on sys.path
    sys.exit("run it from the repository root as: python -m bench.raw ...")

import argparse
import dataclasses
import logging
import os
import time
from dataclasses import dataclass

from bench import flops, report
from bench.common import GIB, MIB, PEAK_BF16_TFLOPS, Nvml, run_header, sig, summarize, write_result

log = logging.getLogger("bench.raw")

SMOKE_CASES = ("256x256:2:1", "256x256:2:2")


@dataclass(frozen=True)
class Case:
    width: int
    height: int
    steps: int | None  # None: the model's default
    batch: int

    @classmethod
    def parse(cls, text: str) -> "Case":
        parts = text.lower().split(":")
        if not 1 <= len(parts) <= 3:
            raise argparse.ArgumentTypeError(f"case {text!r}: use WIDTHxHEIGHT[:STEPS[:BATCH]]")
        try:
            w, _, h = parts[0].partition("x")
            width, height = int(w), int(h or w)
            steps = int(parts[1]) if len(parts) > 1 and parts[1] else None
            batch = int(parts[2]) if len(parts) > 2 else 1
        except ValueError:
            raise argparse.ArgumentTypeError(f"case {text!r}: use WIDTHxHEIGHT[:STEPS[:BATCH]]") from None
        if width % 16 or height % 16 or batch < 1 or (steps is not None and steps < 1):
            raise argparse.ArgumentTypeError(f"case {text!r}: sides must be multiples of 16, steps and batch >= 1")
        return cls(width, height, steps, batch)


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.raw", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dummy:flux.1-dev", help="hub id, local folder or dummy:* (default %(default)s)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp4", "fp8"))
    p.add_argument("--compile", action="store_true", help="compile the repeated transformer blocks")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--fp4-quant-type", default="fp4", choices=("fp4", "nf4"))
    p.add_argument("--compile-cache-dir", help="persistent inductor cache (TORCHINDUCTOR_CACHE_DIR)")
    p.add_argument("--engine-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="any other EngineConfig field, e.g. prompt_cache_size=0 (repeatable)")
    p.add_argument("--case", action="append", type=Case.parse, default=[], help="WxH[:STEPS[:BATCH]] (repeatable)")
    p.add_argument("--sizes", default="1024x1024", help="comma list of WxH when no --case is given")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--batch-sizes", type=int_list, default=[1], help="comma list, e.g. 1,2,4")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per case (median reported)")
    p.add_argument("--warmups", type=int, default=1, help="untimed calls per case before the timed ones")
    p.add_argument("--warmup-steps", type=int, default=2, help="steps of a warm-up call; 0: the case's own")
    p.add_argument("--same-prompt", action="store_true", help="one prompt for every call (prompt cache hits)")
    p.add_argument("--profile", action="store_true", help="one more call per case, timed phase by phase")
    p.add_argument("--torch-profile", action="store_true", help="one more call per case under torch.profiler")
    p.add_argument("--peak-tflops", type=float, default=PEAK_BF16_TFLOPS, help="matrix rate for %%peak")
    p.add_argument("--max-resident-gib", type=float, help="check: memory allocated after load must not exceed")
    p.add_argument("--name", help="result name (default raw-<model>-<precision>[-compile])")
    p.add_argument("--out-dir", help="folder of the JSON result (default bench/results)")
    p.add_argument("--json", help="exact path of the JSON result")
    p.add_argument("--smoke", action="store_true",
                   help="CI check of the harness: dummy:tiny on the CPU, 256x256, 2 steps, batch 1 and 2, profiled")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.device, args.precision, args.compile = "dummy:tiny", "cpu", "bf16", False
        args.case = [Case.parse(c) for c in SMOKE_CASES]
        args.repeats, args.warmups, args.profile = 2, 1, True
        args.name = args.name or "smoke-raw"
    if not args.case:
        steps = args.steps
        args.case = [dataclasses.replace(Case.parse(size), steps=steps, batch=b)
                     for size in args.sizes.split(",") if size.strip() for b in args.batch_sizes]
    elif args.steps is not None:
        args.case = [c if c.steps is not None else dataclasses.replace(c, steps=args.steps) for c in args.case]
    if args.repeats < 1 or args.warmups < 0:
        p.error("--repeats must be >= 1 and --warmups >= 0")
    if not args.name:
        model = args.model.split("/")[-1].replace("dummy:", "")
        args.name = f"raw-{model}-{args.precision}" + ("-compile" if args.compile else "")
    return args


def engine_config(args):
    from models.flux import EngineConfig

    known = {f.name: f for f in dataclasses.fields(EngineConfig)}
    extra = {}
    for item in args.engine_opt:
        key, _, value = item.partition("=")
        if key not in known:
            raise SystemExit(f"--engine-opt {key}: EngineConfig has no such field ({', '.join(known)})")
        extra[key] = _coerce(value)
    return EngineConfig(model=args.model, precision=args.precision, device=args.device, compile=args.compile,
                        fp4_quant_type=args.fp4_quant_type, compile_cache_dir=args.compile_cache_dir, **extra)


def _coerce(value: str):
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


class Prompts:
    """New prompts for every call, or always the same one."""

    def __init__(self, same: bool):
        self.same = same
        self.counter = 0

    def take(self, n: int) -> list[str]:
        # Short enough for dummy:tiny's 64-token limit; every model pads to its max_sequence_length anyway.
        if self.same:
            return ["a red fox in fresh snow at dawn, photo"] * n
        self.counter += n
        return [f"a red fox in fresh snow at dawn, photo {self.counter - n + i}" for i in range(n)]


class Device:
    """Synchronization and memory readings for the engine's device (no-ops on a CPU)."""

    def __init__(self, torch, device):
        self.torch = torch
        self.device = device
        self.cuda = device.type == "cuda"
        self.nvml = Nvml() if self.cuda else None
        self.pci_bus_id = None
        if self.cuda:
            props = torch.cuda.get_device_properties(device)
            if hasattr(props, "pci_bus_id"):
                self.pci_bus_id = (f"{getattr(props, 'pci_domain_id', 0):04X}:{props.pci_bus_id:02X}:"
                                   f"{getattr(props, 'pci_device_id', 0):02X}.0")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def memory(self) -> dict:
        if not self.cuda:
            return {}
        cuda = self.torch.cuda
        used = self.nvml.used_mib(pci_bus_id=self.pci_bus_id) if self.pci_bus_id else None
        if used is None:  # no PCI id from torch: the first visible GPU's physical number
            first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
            used = self.nvml.used_mib(int(first) if first.isdigit() else 0)
        return {
            "allocated_mib": round(cuda.memory_allocated(self.device) / MIB, 1),
            "reserved_mib": round(cuda.memory_reserved(self.device) / MIB, 1),
            "peak_allocated_mib": round(cuda.max_memory_allocated(self.device) / MIB, 1),
            "peak_reserved_mib": round(cuda.max_memory_reserved(self.device) / MIB, 1),
            "nvml_used_mib": used,
            "nvml_process_mib": self.nvml.process_used_mib(os.getpid()),
        }


def measure_case(engine, dev: Device, case: Case, args, prompts: Prompts, shape) -> dict:
    from models.flux import ImageSpec

    info = engine.info
    steps = case.steps or info.default_steps
    guidance = info.default_guidance if args.guidance is None else args.guidance

    def specs(n_steps: int) -> list:
        return [ImageSpec(prompt=p, seed=1000 + prompts.counter + i, width=case.width, height=case.height,
                          steps=n_steps, guidance=guidance) for i, p in enumerate(prompts.take(case.batch))]

    def timed_call(n_steps: int) -> float:
        batch = specs(n_steps)
        dev.sync()
        started = time.perf_counter()
        engine.generate(batch)
        dev.sync()
        return time.perf_counter() - started

    warm_steps = steps if args.warmup_steps <= 0 else min(steps, args.warmup_steps)
    dev.reset_peak()
    warmups = [timed_call(warm_steps) for _ in range(args.warmups)]
    times = [timed_call(steps) for _ in range(args.repeats)]
    memory = dev.memory()
    stats = summarize(times)
    median = stats["median"]
    flop_image = flops.flop_per_image(shape, case.width, case.height, steps, info.max_sequence_length,
                                      engine.pipe.vae_scale_factor)
    tflops = flop_image * case.batch / median / 1e12
    limit_s = flop_image / (args.peak_tflops * 1e12)
    row = {
        "width": case.width, "height": case.height, "steps": steps, "batch": case.batch, "guidance": guidance,
        "warmup_steps": warm_steps, "warmup_s": [round(t, 4) for t in warmups],
        "times_s": [round(t, 4) for t in times], "median_s": round(median, 4), "min_s": round(stats["min"], 4),
        "mean_s": round(stats["mean"], 4), "stdev_s": round(stats["stdev"], 4),
        "s_per_img": round(median / case.batch, 4), "img_per_s": round(case.batch / median, 4),
        "tflop_per_img": sig(flop_image / 1e12), "tflops": sig(tflops),
        "pct_peak": round(100 * tflops / args.peak_tflops, 1) if dev.cuda else None,
        "limit_s_per_img": sig(limit_s), "x_limit": round(median / case.batch / limit_s, 2) if dev.cuda else None,
        "memory": memory,
        "peak_gib": round(memory["peak_allocated_mib"] * MIB / GIB, 2) if memory else None,
    }
    if args.profile:
        from bench.phases import PhaseTimer

        batch = specs(steps)
        with PhaseTimer(engine.pipe, dev.sync) as phases:
            dev.sync()
            started = time.perf_counter()
            engine.generate(batch)
            dev.sync()
        row["phases"] = phases.breakdown(time.perf_counter() - started)
        denoise = row["phases"]["denoise"]
        if denoise:
            row["phases"]["denoise_tflops"] = sig(flop_image * case.batch / denoise / 1e12)
    if args.torch_profile:
        from bench.phases import torch_profile

        batch = specs(steps)
        table, top = torch_profile(lambda: (engine.generate(batch), dev.sync()), dev.cuda)
        print(f"\n--- torch.profiler, {case.width}x{case.height}, {steps} steps, batch {case.batch} ---\n{table}")
        row["torch_profile_top"] = top
    return row


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = run_header("bench.raw", args.name, "bench.raw", argv)

    import torch

    from models.flux import FluxEngine

    config = engine_config(args)
    engine = FluxEngine(config)
    started = time.perf_counter()
    try:
        info = engine.load()
    except Exception as exc:  # fp8 on a GPU without it, a missing package: say so in the result too
        log.exception("loading %s failed", args.model)
        result.update({"config": {"model": args.model, "precision": args.precision, "compile": args.compile},
                       "results": [], "errors": [{"case": "load", "error": f"{type(exc).__name__}: {str(exc)[:300]}"}]})
        print(f"\nresult: {write_result(result, args.out_dir, args.json)}")
        return 1
    dev = Device(torch, engine.device)
    dev.sync()
    load_s = time.perf_counter() - started
    memory_after_load = dev.memory()
    shape = flops.transformer_shape(engine.pipe.transformer)
    result.update({
        "card": info.device_name,
        "device": {"type": engine.device.type, "name": info.device_name,
                   "capability": ".".join(map(str, torch.cuda.get_device_capability(engine.device)))
                   if dev.cuda else None,
                   "cuda": torch.version.cuda, "driver": dev.nvml.driver_version() if dev.nvml else None},
        "config": {"model": args.model, "precision": args.precision, "compile": info.compiled,
                   "dtype": info.dtype, "synthetic": info.synthetic, "repeats": args.repeats,
                   "warmups": args.warmups, "warmup_steps": args.warmup_steps, "same_prompt": args.same_prompt,
                   "text_tokens": info.max_sequence_length, "peak_tflops": args.peak_tflops,
                   "engine": {k: v for k, v in dataclasses.asdict(config).items() if k != "warmup_sizes"},
                   "notes": info.notes},
        "flop_model": dict(shape.as_dict(), counted="transformer only: linear layers + attention"),
        "load_s": round(load_s, 2),
        "memory_after_load": memory_after_load,
        "resident_gib": round(memory_after_load["allocated_mib"] * MIB / GIB, 2) if memory_after_load else None,
        "results": [],
        "errors": [],
    })
    print(f"loaded {args.model} ({args.precision}{', compiled' if info.compiled else ''}) on {info.device_name} "
          f"in {load_s:.1f} s", flush=True)
    if args.max_resident_gib is not None and result["resident_gib"] is not None:
        result["checks"] = {"max_resident_gib": args.max_resident_gib,
                            "resident_ok": result["resident_gib"] <= args.max_resident_gib}
    prompts = Prompts(args.same_prompt)
    for case in args.case:
        label = f"{case.width}x{case.height}:{case.steps or info.default_steps}:{case.batch}"
        try:
            row = measure_case(engine, dev, case, args, prompts, shape)
        except Exception as exc:  # one failing case (an OOM at a large batch) must not lose the others
            log.exception("case %s failed", label)
            result["errors"].append({"case": label, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            engine.release_memory()
            continue
        result["results"].append(row)
        write_result(result, args.out_dir, args.json)  # a run stopped later still leaves these figures
        print(f"  {label}: median {row['median_s']:.3f} s, {row['img_per_s']:.3f} img/s, "
              f"{row['tflops']:.1f} TFLOP/s", flush=True)
    path = write_result(result, args.out_dir, args.json)
    print(f"\nresult: {path}\n")
    print(report.render(result))
    return 0 if result["results"] and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
