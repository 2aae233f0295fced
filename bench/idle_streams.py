"""Idle event streams: what N open GET /jobs/{id}/events streams cost a render on the same worker.

    python -m bench.idle_streams --url http://127.0.0.1:8080 --streams 0,3000 --runs 3 --sources 16   # via nginx
    python -m bench.idle_streams --url http://127.0.0.1:8001 --streams 0,500,3000 --size 768 --window 4

Per run, on a worker (directly or through nginx, which routes a job's calls to the worker that owns it): a
long job M renders; one observer stream on M timestamps each of its steps. A target job T waits behind M,
and N streams are opened on T (raw sockets: the client costs next to nothing). T does not change while M
renders, so those N streams are idle, as streams on queued jobs mostly are. Over a window after they are all
open, M's seconds per denoising step is the figure, against the same window with N = 0. Meanwhile GET
/jobs/{T} is timed, to show the worker stays responsive. The worker needs FLUX_MAX_CONCURRENT=1 (so T
waits) and FLUX_MAX_EVENT_STREAMS_PER_KEY above N (all streams come from one address).

Prints a table (median s/step, its slowdown against the first level, p50/max GET latency) and writes a JSON
result to bench/results/.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import time
import urllib.parse

import httpx

from bench.common import run_header, write_result

def raise_open_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def open_stream(url: str, job_id: str, headers: dict | None = None, source: str | None = None):
    """One SSE connection, returned once its first event arrived (so the server holds it). `source`: the local
    address to connect from (nginx bounds the connections of one client address)."""
    parts = urllib.parse.urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80,
                                                   local_addr=(source, 0) if source else None)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    writer.write(f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: text/event-stream\r\n"
                 f"{extra}\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        writer.close()
        raise RuntimeError(f"stream refused: {head.splitlines()[0].decode(errors='replace')}")
    await reader.readuntil(b"\n\n")
    return reader, writer


async def open_streams(url: str, job_id: str, n: int, headers: dict | None = None, parallel: int = 200,
                       sources: list[str] | None = None):
    streams: list = []
    limit = asyncio.Semaphore(parallel)

    async def one(i: int):
        async with limit:
            source = sources[i % len(sources)] if sources else None
            streams.append(await open_stream(url, job_id, headers, source))

    await asyncio.gather(*(one(i) for i in range(n)))
    return streams


def close_streams(streams) -> None:
    for _, writer in streams:
        writer.close()


async def observe_steps(url: str, job_id: str, steps: list[tuple[float, int]], started: asyncio.Event):
    """Read M's events, recording (arrival time, step) of each running event."""
    reader, writer = await open_stream(url, job_id)
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            if line.startswith(b"data: {") and b'"status": "running"' in line:
                step = json.loads(line[6:])["step"]
                steps.append((time.perf_counter(), step))
                started.set()
            elif line.startswith(b"event: done"):
                return
    finally:
        writer.close()


def seconds_per_step(steps: list[tuple[float, int]], start: float, end: float) -> float:
    """The least-squares slope of arrival time over step: every step in the window counts, so one event the
    client read late (a busy machine) moves the figure a little instead of setting the window's end."""
    inside = [(t, s) for t, s in steps if start <= t <= end]
    if len(inside) < 3:
        raise RuntimeError("too few steps in the window: make the measured job longer (--size, --steps)")
    mean_t = statistics.fmean(t for t, _ in inside)
    mean_s = statistics.fmean(s for _, s in inside)
    return sum((t - mean_t) * (s - mean_s) for t, s in inside) / sum((s - mean_s) ** 2 for _, s in inside)


async def one_run(url: str, streams_n: int, body: dict, window_s: float, headers: dict | None = None,
                  sources: list[str] | None = None) -> dict:
    """M's seconds per step over window_s with streams_n idle streams open on T."""
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers) as http:
        measured = (await http.post("/jobs", json=body)).json()["job_id"]
        steps: list[tuple[float, int]] = []
        started = asyncio.Event()
        observer = asyncio.create_task(observe_steps(url, measured, steps, started))
        target = None
        streams = []
        try:
            await asyncio.wait_for(started.wait(), 120)
            target = (await http.post("/jobs", json=dict(body, prompt="target"))).json()["job_id"]
            streams = await open_streams(url, target, streams_n, headers, sources=sources)
            await asyncio.sleep(0.5)  # let the opening settle
            start = time.perf_counter()
            latencies = []
            # the window, stretched until it holds a few steps (a loaded machine renders slower)
            while time.perf_counter() - start < window_s or sum(1 for t, _ in steps if t >= start) < 4:
                if observer.done():
                    break
                t = time.perf_counter()
                (await http.get(f"/jobs/{target}")).raise_for_status()
                latencies.append(time.perf_counter() - t)
                await asyncio.sleep(0.05)
            end = time.perf_counter()
            if observer.done():
                raise RuntimeError("the measured job ended inside the window: make it longer (--size, --steps)")
            per_step = seconds_per_step(steps, start, end)
        finally:
            close_streams(streams)
            for job_id in (target, measured):
                if job_id:
                    await http.delete(f"/jobs/{job_id}")
            await asyncio.wait_for(observer, 60)
        return {"streams": streams_n, "s_per_step": per_step,
                "get_p50_ms": statistics.median(latencies) * 1000, "get_max_ms": max(latencies) * 1000}


async def measure(url: str, levels: list[int], runs: int, body: dict, window_s: float = 3.0,
                  headers: dict | None = None, sources: list[str] | None = None) -> list[dict]:
    """Runs alternate between levels, so drift (thermal, other load) touches every level alike."""
    results: dict[int, list[dict]] = {n: [] for n in levels}
    for _ in range(runs):
        for n in levels:
            results[n].append(await one_run(url, n, body, window_s, headers, sources))
    rows = []
    for n in levels:
        rs = results[n]
        rows.append({"streams": n, "s_per_step": statistics.median(r["s_per_step"] for r in rs),
                     "s_per_step_min": min(r["s_per_step"] for r in rs),
                     "s_per_step_runs": [r["s_per_step"] for r in rs],
                     "get_p50_ms": statistics.median(r["get_p50_ms"] for r in rs),
                     "get_max_ms": max(r["get_max_ms"] for r in rs)})
    base, base_min = rows[0]["s_per_step"], rows[0]["s_per_step_min"]
    for n, row in zip(levels, rows):
        row["slowdown_pct"] = round((row["s_per_step"] / base - 1) * 100, 1)
        # the fastest run of each level: on a shared machine other load only ever adds time
        row["slowdown_min_pct"] = round((row["s_per_step_min"] / base_min - 1) * 100, 1)
        # each run against the baseline run just before it (same round, seconds apart): load that comes and
        # goes over a run touches both of a pair, where the fastest of each level can come from a quiet moment
        # one level had and the other did not
        pairs = [r["s_per_step"] / b["s_per_step"] for r, b in zip(results[n], results[levels[0]])]
        row["slowdown_paired_pct"] = round((statistics.median(pairs) - 1) * 100, 1)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="a worker, or nginx in front of workers")
    ap.add_argument("--streams", default="0,3000", help="comma-separated stream counts; the first is the baseline")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", type=int, default=768, help="side of the measured job")
    ap.add_argument("--steps", type=int, default=100, help="its steps: it must outlast opening the streams and "
                    "the window")
    ap.add_argument("--window", type=float, default=3.0, help="seconds over which its step rate is measured")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--sources", type=int, default=0, help="open the streams from this many loopback addresses "
                    "(127.0.0.2, 127.0.0.3, ...): nginx bounds the connections of one address (limit_conn)")
    args = ap.parse_args(argv)
    raise_open_file_limit()
    levels = [int(s) for s in args.streams.split(",")]
    body = {"prompt": "measured", "width": args.size, "height": args.size, "num_inference_steps": args.steps,
            "seed": 3}
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    sources = [f"127.0.0.{i + 2}" for i in range(args.sources)] or None
    rows = asyncio.run(measure(args.url, levels, args.runs, body, args.window, headers, sources))
    result = run_header("idle_streams", f"idle-streams-{args.size}-{args.steps}", "bench.idle_streams",
                        argv if argv is not None else __import__("sys").argv[1:])
    result.update({"url": args.url, "body": body, "runs": args.runs, "window_s": args.window, "rows": rows})
    path = write_result(result)
    print(f"{'streams':>8} {'s/step (median)':>16} {'slowdown':>9} {'s/step (min)':>13} {'slowdown':>9} "
          f"{'paired':>7} {'GET p50 ms':>11} {'GET max ms':>11}")
    for row in rows:
        print(f"{row['streams']:>8} {row['s_per_step']:>16.4f} {row['slowdown_pct']:>8.1f}% "
              f"{row['s_per_step_min']:>13.4f} {row['slowdown_min_pct']:>8.1f}% "
              f"{row['slowdown_paired_pct']:>6.1f}% {row['get_p50_ms']:>11.1f} {row['get_max_ms']:>11.1f}")
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
