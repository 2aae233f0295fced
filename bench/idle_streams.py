"""Idle event streams: what N open GET /jobs/{id}/events streams cost a render on the same worker.

    python -m bench.idle_streams --url http://127.0.0.1:8080 --streams 0,3000 --runs 3
    python -m bench.idle_streams --url http://127.0.0.1:8001 --streams 0,500,3000 --size 512 --steps 20

Per run, on a worker (directly or through nginx, which routes a job's calls to the worker that owns it):
a gate job holds the GPU, the measured job M waits behind it and a target job T behind M. N streams are
opened on T (raw sockets: the client costs next to nothing), then the gate is cancelled, M renders, and its
pipeline time (the job's generate_ms) is the figure. T changes only when M is taken and when M finishes, so
during M's render the N streams are idle, as streams on queued jobs are in production. Meanwhile GET
/jobs/{T} is timed, to show the worker stays responsive. The worker needs FLUX_MAX_CONCURRENT=1 (so M renders
alone) and FLUX_MAX_EVENT_STREAMS_PER_KEY above N (all streams come from one address).

Prints a table (median render s, its slowdown against N=0, p50/max GET latency) and writes a JSON result.
"""
from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import time
import urllib.parse

import httpx

from bench.common import run_header, write_result

GATE = {"prompt": "gate", "width": 1024, "height": 1024, "num_inference_steps": 100, "seed": 1}


def raise_open_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def open_stream(url: str, job_id: str, headers: dict | None = None):
    """One SSE connection, returned once its first event arrived (so the server holds it)."""
    parts = urllib.parse.urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
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


async def open_streams(url: str, job_id: str, n: int, headers: dict | None = None, parallel: int = 200):
    streams: list = []
    limit = asyncio.Semaphore(parallel)

    async def one():
        async with limit:
            streams.append(await open_stream(url, job_id, headers))

    await asyncio.gather(*(one() for _ in range(n)))
    return streams


def close_streams(streams) -> None:
    for _, writer in streams:
        writer.close()


async def wait_status(http: httpx.AsyncClient, job_id: str, statuses: tuple[str, ...], timeout: float = 300):
    deadline = time.monotonic() + timeout
    while True:
        view = (await http.get(f"/jobs/{job_id}")).json()
        if view["status"] in statuses:
            return view
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} still {view['status']} after {timeout} s")
        await asyncio.sleep(0.05)


async def one_run(url: str, streams_n: int, body: dict, headers: dict | None = None) -> dict:
    """One measured render with streams_n idle streams open; returns its figures."""
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers) as http:
        gate = (await http.post("/jobs", json=GATE)).json()["job_id"]
        await wait_status(http, gate, ("running",))
        measured = (await http.post("/jobs", json=body)).json()["job_id"]
        target = (await http.post("/jobs", json=dict(body, prompt="target"))).json()["job_id"]
        streams = await open_streams(url, target, streams_n, headers)
        try:
            await http.delete(f"/jobs/{gate}")
            await wait_status(http, measured, ("running", "succeeded", "failed", "cancelled"))
            latencies = []
            while True:  # GET latency while M renders, 20 per second
                started = time.perf_counter()
                view = (await http.get(f"/jobs/{measured}")).json()
                latencies.append(time.perf_counter() - started)
                if view["status"] != "running":
                    break
                await asyncio.sleep(0.05)
            if view["status"] != "succeeded":
                raise RuntimeError(f"the measured job ended {view['status']}: {view.get('error')}")
        finally:
            close_streams(streams)
            await http.delete(f"/jobs/{target}")
        return {"streams": streams_n, "render_s": view["result"]["generate_ms"] / 1000,
                "get_p50_ms": statistics.median(latencies) * 1000, "get_max_ms": max(latencies) * 1000}


async def measure(url: str, levels: list[int], runs: int, body: dict, headers: dict | None = None) -> list[dict]:
    """Runs alternate between levels, so drift (thermal, other load) touches every level alike."""
    results: dict[int, list[dict]] = {n: [] for n in levels}
    for _ in range(runs):
        for n in levels:
            results[n].append(await one_run(url, n, body, headers))
    rows = []
    for n in levels:
        rs = results[n]
        rows.append({"streams": n, "render_s": statistics.median(r["render_s"] for r in rs),
                     "renders_s": [r["render_s"] for r in rs],
                     "get_p50_ms": statistics.median(r["get_p50_ms"] for r in rs),
                     "get_max_ms": max(r["get_max_ms"] for r in rs)})
    base = rows[0]["render_s"]
    for row in rows:
        row["slowdown_pct"] = round((row["render_s"] / base - 1) * 100, 1)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="a worker, or nginx in front of workers")
    ap.add_argument("--streams", default="0,3000", help="comma-separated stream counts; the first is the baseline")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--api-key", default=None)
    args = ap.parse_args(argv)
    raise_open_file_limit()
    levels = [int(s) for s in args.streams.split(",")]
    body = {"prompt": "measured", "width": args.size, "height": args.size, "num_inference_steps": args.steps,
            "seed": 3}
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    rows = asyncio.run(measure(args.url, levels, args.runs, body, headers))
    result = run_header("idle_streams", f"idle-streams-{args.size}-{args.steps}", "bench.idle_streams",
                        argv if argv is not None else __import__("sys").argv[1:])
    result.update({"url": args.url, "body": body, "runs": args.runs, "rows": rows})
    path = write_result(result)
    print(f"{'streams':>8} {'render s (median)':>18} {'slowdown':>9} {'GET p50 ms':>11} {'GET max ms':>11}")
    for row in rows:
        print(f"{row['streams']:>8} {row['render_s']:>18.3f} {row['slowdown_pct']:>8.1f}% "
              f"{row['get_p50_ms']:>11.1f} {row['get_max_ms']:>11.1f}")
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
