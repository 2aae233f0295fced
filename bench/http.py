"""HTTP mode: load against the real service (a worker, or nginx in front of several) over POST /generate.

    python -m bench.http --url http://127.0.0.1:8080 --concurrency 1,2,4 --requests 16 --width 1024 --height 1024
    python -m bench.http --url http://127.0.0.1:8080 --rate 0.1,0.2 --requests 20        # open loop
    python -m bench.http --url http://127.0.0.1:8180 --raw-baseline bench/results/raw-....json \\
        --start "FLUX_MODEL=dummy:flux.1-dev BASE_PORT=8100 NGINX_PORT=8180 ./start_multi_gpu.sh start -m bf16" \\
        --gpus 1,2,4 --concurrency 2 --requests 8                  # starts 1, 2, 4 workers in turn
    python -m bench.http --smoke                                   # one CPU worker with dummy:tiny (CI)

Each load level is a closed loop at a concurrency (--concurrency) or an open loop at a rate in requests/s
(--rate). Before the first level of every started service, --warmup requests are sent and not counted.
Reports images/s, seconds per image, latency percentiles, the server's queue and generation times, the
requests each worker answered, errors by status, achieved TFLOP/s per GPU (bench/flops.py), and with
--raw-baseline the ratio to the in-process loop of bench.raw (same size and steps; batch 1, and the best batch).
--gpus N,M starts the service once per count (NUM_GPUS=N in its environment, {gpus} in the command is
replaced), scales concurrency and requests by N (--no-scale-concurrency to keep them), and reports the
scaling efficiency: images/s at N GPUs / (N x images/s at 1 GPU).
"""
from __future__ import annotations

import sys

if not __package__:  # as a script, bench/ would come first on sys.path and shadow the standard http module
    sys.exit("run it from the repository root as: python -m bench.http ...")

import argparse
import asyncio
import signal
import tempfile

import httpx

from bench import flops, report
from bench.common import PEAK_BF16_TFLOPS, Nvml, load_result, run_header, sig, write_result
from bench.load import RequestFactory, closed_loop, level_summary, open_loop
from bench.stack import Stack, StackError, default_stop_command, smoke_worker

EXIT_STACK_FAILED = 3


def number_list(kind):
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.http", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="base URL of nginx or of one worker, e.g. http://127.0.0.1:8080")
    p.add_argument("--path", default="/generate", help="endpoint (default %(default)s; e.g. /generate/fast)")
    p.add_argument("--concurrency", type=number_list(int), help="closed-loop levels, comma list (default 1)")
    p.add_argument("--rate", type=number_list(float), default=[], help="open-loop levels in requests/s, comma list")
    p.add_argument("--uniform", action="store_true", help="open loop: evenly spaced arrivals instead of Poisson")
    p.add_argument("--requests", type=int, default=8, help="measured requests per level (default %(default)s)")
    p.add_argument("--duration", type=float, help="seconds per level instead of a request count")
    p.add_argument("--warmup", type=int, default=-1, help="uncounted requests after each start; -1: one per "
                   "concurrent client of the largest level")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--steps", type=int, help="num_inference_steps (default: the server's)")
    p.add_argument("--guidance", type=float, help="guidance_scale (default: the server's)")
    p.add_argument("--same-prompt", action="store_true", help="one prompt for all (prompt-cache hits)")
    p.add_argument("--fetch-images", action="store_true", help="also download every image (counted in latency)")
    p.add_argument("--timeout", type=float, default=900.0, help="per-request timeout in seconds")
    p.add_argument("--max-in-flight", type=int, default=1024, help="open loop: the client's own cap")
    p.add_argument("--raw-baseline", help="bench.raw (or suite) JSON for the e2e/raw ratio")
    p.add_argument("--start", help="command that starts the service (run by bash from the repository root)")
    p.add_argument("--stop", help="command that stops it (default for start_multi_gpu.sh: the same with 'stop'; "
                   "otherwise SIGTERM to the started process group)")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for /health after --start")
    p.add_argument("--stack-log", help="file for the start/stop commands' output")
    p.add_argument("--gpus", type=number_list(int), help="sweep: start the service with NUM_GPUS=N for each N")
    p.add_argument("--scale-concurrency", action=argparse.BooleanOptionalAction, default=True,
                   help="in a --gpus sweep, multiply concurrency, rate and requests by N (default on)")
    p.add_argument("--num-gpus", type=int, default=1,
                   help="GPUs behind --url when nothing is started (for per-GPU figures)")
    p.add_argument("--peak-tflops", type=float, default=PEAK_BF16_TFLOPS)
    p.add_argument("--name", help="result name (default http-<model>-<W>x<H>)")
    p.add_argument("--out-dir", help="folder of the JSON result (default bench/results)")
    p.add_argument("--json", help="exact path of the JSON result")
    p.add_argument("--smoke", action="store_true", help="CI check of the harness: starts one CPU worker with "
                   "dummy:tiny on a free port, 256x256, 2 steps, concurrency 1 and 2, one open-loop level")
    args = p.parse_args(argv)
    if args.smoke:
        args.width = args.height = 256
        args.steps, args.concurrency, args.rate = 2, [1, 2], [4.0]
        args.requests, args.warmup, args.name = 4, 1, args.name or "smoke-http"
        args.start = args.gpus = None
    elif not args.url:
        p.error("--url is required (or --smoke)")
    if args.gpus and not args.start:
        p.error("--gpus needs --start (the command that starts N workers)")
    if args.concurrency is None:
        args.concurrency = [] if args.rate else [1]
    if args.duration is None and args.requests < 1:
        p.error("--requests must be >= 1")
    return args


# ---- what the server runs, and what it costs ------------------------------------------------------
def server_info(url: str) -> dict:
    try:
        with httpx.Client(trust_env=False, timeout=10) as client:
            resp = client.get(url.rstrip("/") + "/")
            return resp.json() if resp.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        return {}


def flop_per_image(model: str | None, width: int, height: int, steps: int | None) -> tuple[float | None, str]:
    """Transformer FLOP of one image for the server's model; (None, why) when its config is out of reach."""
    if not model or not steps:
        return None, "model or steps unknown"
    try:
        from models import dummy

        if dummy.is_dummy(model):
            spec = dummy.dummy_spec(model)
            config, text_tokens = spec.transformer, spec.max_sequence_length
        else:
            from diffusers import FluxTransformer2DModel

            config = FluxTransformer2DModel.load_config(model, subfolder="transformer", local_files_only=True)
            text_tokens = 512 if config.get("guidance_embeds", True) else 256  # the engine's rule
        shape = flops.shape_from_config(config)
        return flops.flop_per_image(shape, width, height, steps, text_tokens), ""
    except Exception as exc:  # an unknown model only costs the TFLOP/s column
        return None, f"{type(exc).__name__}: {exc}"[:200]


def raw_baseline(path: str, width: int, height: int, steps: int | None, info: dict) -> dict | None:
    """The bench.raw rows for this size and steps: batch-1 and best-batch throughput, preferring the server's
    precision and compile setting when the file holds several runs (a suite file does)."""
    doc = load_result(path)
    docs = [doc] if doc.get("kind") == "bench.raw" else [
        item["result"] for item in doc.get("items", []) if (item.get("result") or {}).get("kind") == "bench.raw"]
    candidates = []
    for d in docs:
        cfg = d.get("config", {})
        for row in d.get("results", []):
            if (row["width"], row["height"]) == (width, height) and (steps is None or row["steps"] == steps):
                candidates.append((cfg.get("precision"), bool(cfg.get("compile")), d.get("name"), row))
    for wanted in ((info.get("precision"), bool(info.get("compiled"))), (info.get("precision"), None), (None, None)):
        pick = [c for c in candidates if (wanted[0] is None or c[0] == wanted[0]) and
                (wanted[1] is None or c[1] == wanted[1])]
        if pick:
            break
    else:
        return None
    bs1 = [c[3] for c in pick if c[3]["batch"] == 1]
    best = max(pick, key=lambda c: c[3]["img_per_s"])
    return {"source": path, "name": best[2], "precision": best[0], "compile": best[1],
            "bs1_img_per_s": bs1[0]["img_per_s"] if bs1 else None,
            "bs1_median_s": bs1[0]["median_s"] if bs1 else None,
            "best_img_per_s": best[3]["img_per_s"], "best_batch": best[3]["batch"]}


# ---- one started (or given) service ------------------------------------------------------------
async def run_levels(args, url: str, gpus: int, factory: RequestFactory) -> tuple[list[dict], list[float]]:
    scale = gpus if args.scale_concurrency and args.gpus else 1
    levels = [("closed", c * scale) for c in args.concurrency] + [("open", r * scale) for r in args.rate]
    requests = args.requests * scale if args.duration is None else None
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    endpoint = url.rstrip("/") + args.path
    out = []
    async with httpx.AsyncClient(trust_env=False, timeout=timeout, limits=limits) as client:
        warm = args.warmup if args.warmup >= 0 else max([int(v) for k, v in levels if k == "closed"] or [1])
        warm_samples, _ = await closed_loop(client, endpoint, factory, max(1, warm), requests=warm) if warm else ([], 0)
        for kind, value in levels:
            print(f"[http] {gpus} GPU(s), {kind} loop {'c' if kind == 'closed' else 'rate'}={value:g}, "
                  f"{requests or args.duration} {'requests' if requests else 's'}", file=sys.stderr, flush=True)
            if kind == "closed":
                samples, wall = await closed_loop(client, endpoint, factory, int(value), requests, args.duration,
                                                  args.fetch_images)
                skipped = 0
            else:
                samples, wall, skipped = await open_loop(client, endpoint, factory, value, requests, args.duration,
                                                         not args.uniform, max_in_flight=args.max_in_flight,
                                                         fetch_image=args.fetch_images)
            level = {"gpus": gpus, "mode": kind, "load": f"c={value:g}" if kind == "closed" else f"{value:g}/s",
                     "concurrency": int(value) if kind == "closed" else None,
                     "rate": value if kind == "open" else None, **level_summary(samples, wall)}
            if skipped:
                level["skipped_by_client_cap"] = skipped
            out.append(level)
    return out, [round(s.latency_s, 3) for s in warm_samples if s.ok]


def add_derived(result: dict, args) -> None:
    """TFLOP/s, ratios to the raw loop, scaling efficiency against the best 1-GPU level."""
    flop = result.get("flop_per_image")
    base = result.get("raw_baseline") or {}
    best_one = max((lvl["img_per_s"] for lvl in result["levels"] if lvl["gpus"] == 1), default=0.0)
    for lvl in result["levels"]:
        per_gpu = lvl["img_per_s"] / lvl["gpus"]
        lvl["tflops_per_gpu"] = sig(per_gpu * flop / 1e12) if flop else None
        on_gpu = flop and result["gpu_run"]
        lvl["pct_peak"] = round(100 * lvl["tflops_per_gpu"] / args.peak_tflops, 1) if on_gpu else None
        lvl["e2e_raw_ratio"] = round(per_gpu / base["bs1_img_per_s"], 4) if base.get("bs1_img_per_s") else None
        lvl["vs_best_batch"] = round(per_gpu / base["best_img_per_s"], 4) if base.get("best_img_per_s") else None
        lvl["scaling_efficiency"] = (round(lvl["img_per_s"] / (lvl["gpus"] * best_one), 4)
                                     if best_one and len({x["gpus"] for x in result["levels"]}) > 1 else None)
    scaling = {}
    for lvl in result["levels"]:
        best = scaling.setdefault(lvl["gpus"], {"gpus": lvl["gpus"], "best_img_per_s": 0.0})
        best["best_img_per_s"] = max(best["best_img_per_s"], lvl["img_per_s"])
    for row in scaling.values():
        row["efficiency"] = round(row["best_img_per_s"] / (row["gpus"] * best_one), 4) if best_one else None
    result["scaling"] = sorted(scaling.values(), key=lambda r: r["gpus"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # SIGTERM (a time limit) unwinds like an exception, so a started service is still stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    name = args.name or f"http-{args.width}x{args.height}"
    result = run_header("bench.http", name, "bench.http", argv)
    tmp = tempfile.TemporaryDirectory(prefix="bench-http-") if args.smoke else None
    plans: list[tuple[int, Stack | None, str]] = []
    if args.smoke:
        stack, url = smoke_worker(tmp.name)
        plans.append((1, stack, url))
    elif args.gpus:
        for n in args.gpus:
            plans.append((n, Stack(args.start.replace("{gpus}", str(n)), args.url, stop_cmd=args.stop,
                                   env={"NUM_GPUS": str(n)}, log_path=args.stack_log,
                                   ready_timeout=args.ready_timeout), args.url))
    elif args.start:
        plans.append((args.num_gpus, Stack(args.start, args.url, stop_cmd=args.stop, log_path=args.stack_log,
                                           ready_timeout=args.ready_timeout), args.url))
    else:
        plans.append((args.num_gpus, None, args.url))
    result.update({"config": {
        "url": plans[0][2], "path": args.path, "width": args.width, "height": args.height, "steps": args.steps,
        "guidance": args.guidance, "concurrency": args.concurrency, "rate": args.rate, "poisson": not args.uniform,
        "requests": args.requests, "duration": args.duration, "warmup": args.warmup, "gpus": args.gpus,
        "scale_concurrency": args.scale_concurrency, "same_prompt": args.same_prompt,
        "fetch_images": args.fetch_images, "timeout": args.timeout, "start": args.start,
        "stop": args.stop or (default_stop_command(args.start) if args.start else None),
        "peak_tflops": args.peak_tflops}, "levels": [], "stacks": [], "errors": []})
    nvml = Nvml()
    started_any = False
    factory = RequestFactory(args.width, args.height, args.steps, args.guidance, args.same_prompt)
    for gpus, stack, url in plans:
        entry = {"gpus": gpus}
        try:
            if stack is not None:
                entry["ready_s"] = round(stack.start(), 1)
            started_any = True
            info = server_info(url)
            entry["server"] = info
            levels, warm = asyncio.run(run_levels(args, url, gpus, factory))
            entry["warmup_latency_s"] = warm
            entry["gpu_memory"] = nvml.devices()
            result["levels"] += levels
        except StackError as exc:
            print(f"[http] {gpus} GPU(s): {exc}", file=sys.stderr, flush=True)
            result["errors"].append({"gpus": gpus, "error": str(exc).splitlines()[0]})
            entry["error"] = str(exc)
        finally:
            if stack is not None:
                stack.stop()
        result["stacks"].append(entry)
    info = next((s["server"] for s in result["stacks"] if s.get("server")), {})
    steps = args.steps or info.get("default_steps")
    device = info.get("device")
    result["card"] = device or (nvml.devices()[0]["name"] if nvml.devices() else "cpu")
    result["gpu_run"] = bool(device and device != "cpu")
    result["config"].update({"model": info.get("model"), "precision": info.get("precision"),
                             "compiled": info.get("compiled"), "steps": steps})
    result["flop_per_image"], why = flop_per_image(info.get("model"), args.width, args.height, steps)
    if why:
        result["flop_note"] = why
    if args.raw_baseline:
        result["raw_baseline"] = raw_baseline(args.raw_baseline, args.width, args.height, steps, info)
        if result["raw_baseline"] is None:
            result["errors"].append(f"no {args.width}x{args.height}/{steps} row in {args.raw_baseline}")
    add_derived(result, args)
    if tmp is not None:
        tmp.cleanup()
    path = write_result(result, args.out_dir, args.json)
    print(f"\nresult: {path}\n")
    print(report.render(result))
    if not started_any:
        return EXIT_STACK_FAILED
    failed = any(lvl["errors_total"] or not lvl["ok"] for lvl in result["levels"])
    return 1 if failed or result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
