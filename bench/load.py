"""Load generation against POST /generate: a closed loop at fixed concurrency, an open loop at a fixed rate.

Closed loop: C clients each send the next request as soon as their previous one is answered, which keeps
C requests in the system (throughput at a given concurrency). Open loop: requests arrive on a schedule
(Poisson by default) whether or not earlier ones are answered, as independent users do (latency at a
given offered load). Throughput counts answered images over the wall time from the first send to the
last answer.
"""
from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import Counter
from dataclasses import dataclass

import httpx

from bench.common import percentile, summarize


@dataclass
class Sample:
    ok: bool
    status: str            # HTTP status ("200", "503") or the exception's name ("ReadTimeout")
    latency_s: float
    sent_at: float         # seconds after the level's start
    queue_ms: float | None = None
    generate_ms: float | None = None
    worker: str | None = None
    error: str | None = None


class RequestFactory:
    """Bodies for POST /generate; every request gets a new prompt and seed unless same_prompt."""

    def __init__(self, width: int, height: int, steps: int | None, guidance: float | None, same_prompt: bool):
        self.width, self.height, self.steps, self.guidance = width, height, steps, guidance
        self.same_prompt = same_prompt
        self.counter = itertools.count()

    def body(self) -> dict:
        n = next(self.counter)
        body = {"prompt": "a lighthouse on a cliff at dusk" if self.same_prompt else f"a lighthouse at dusk, take {n}",
                "width": self.width, "height": self.height, "seed": n}
        if self.steps is not None:
            body["num_inference_steps"] = self.steps
        if self.guidance is not None:
            body["guidance_scale"] = self.guidance
        return body


def worker_key(data: dict) -> str | None:
    """Which worker answered: its GPU number, else the job id's prefix (the worker id, its port by default)."""
    if data.get("gpu") is not None:
        return f"gpu{data['gpu']}"
    job_id = str(data.get("job_id") or "")
    return f"worker {job_id.split('-', 1)[0]}" if "-" in job_id else None


async def send(client: httpx.AsyncClient, url: str, body: dict, t0: float, fetch_image: bool = False) -> Sample:
    sent = time.perf_counter()
    try:
        resp = await client.post(url, json=body)
        if resp.status_code != 200:
            return Sample(False, str(resp.status_code), time.perf_counter() - sent, sent - t0,
                          error=resp.text[:200])
        data = resp.json()
        if fetch_image and data.get("image_url"):
            image = await client.get(data["image_url"])
            if image.status_code != 200:
                return Sample(False, f"image {image.status_code}", time.perf_counter() - sent, sent - t0,
                              error=image.text[:200])
        return Sample(True, "200", time.perf_counter() - sent, sent - t0, data.get("queue_ms"),
                      data.get("generate_ms"), worker_key(data))
    except (httpx.HTTPError, ValueError) as exc:
        return Sample(False, type(exc).__name__, time.perf_counter() - sent, sent - t0, error=str(exc)[:200])


async def closed_loop(client: httpx.AsyncClient, url: str, factory: RequestFactory, concurrency: int,
                      requests: int | None = None, duration: float | None = None,
                      fetch_image: bool = False) -> tuple[list[Sample], float]:
    """`concurrency` clients until `requests` were sent (or `duration` seconds passed); returns samples, wall."""
    t0 = time.perf_counter()
    tickets = itertools.count()
    samples: list[Sample] = []
    last_done = [t0]

    async def client_loop():
        while True:
            if duration is not None:
                if time.perf_counter() - t0 >= duration:
                    return
            elif next(tickets) >= requests:
                return
            samples.append(await send(client, url, factory.body(), t0, fetch_image))
            last_done[0] = max(last_done[0], time.perf_counter())

    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return samples, last_done[0] - t0


async def open_loop(client: httpx.AsyncClient, url: str, factory: RequestFactory, rate: float,
                    requests: int | None = None, duration: float | None = None, poisson: bool = True,
                    seed: int = 0, max_in_flight: int = 1024,
                    fetch_image: bool = False) -> tuple[list[Sample], float, int]:
    """Arrivals at `rate` per second; returns samples, wall and how many arrivals were skipped because
    `max_in_flight` requests were already open (the client's own limit, reported, never hidden)."""
    rng = random.Random(seed)
    t0 = time.perf_counter()
    tasks: list[asyncio.Task] = []
    skipped = 0
    at = 0.0
    for n in itertools.count():
        if requests is not None and n >= requests:
            break
        if duration is not None and at >= duration:
            break
        delay = at - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        if sum(not t.done() for t in tasks) >= max_in_flight:
            skipped += 1
        else:
            tasks.append(asyncio.create_task(send(client, url, factory.body(), t0, fetch_image)))
        at += rng.expovariate(rate) if poisson else 1.0 / rate
    samples = list(await asyncio.gather(*tasks))
    end = max((t0 + s.sent_at + s.latency_s for s in samples), default=t0)
    return samples, end - t0, skipped


def level_summary(samples: list[Sample], wall_s: float) -> dict:
    ok = [s for s in samples if s.ok]
    failed = [s for s in samples if not s.ok]
    errors = Counter(s.status for s in failed)
    samples_by_status = {}
    for s in failed:
        samples_by_status.setdefault(s.status, s.error)
    queue = [s.queue_ms for s in ok if s.queue_ms is not None]
    gen = [s.generate_ms for s in ok if s.generate_ms is not None]
    img_per_s = len(ok) / wall_s if wall_s > 0 and ok else 0.0
    lat = summarize(s.latency_s for s in ok)
    return {
        "sent": len(samples), "ok": len(ok), "errors_total": len(failed), "errors": dict(errors),
        "error_samples": samples_by_status, "wall_s": round(wall_s, 3), "img_per_s": round(img_per_s, 4),
        "s_per_img": round(1 / img_per_s, 4) if img_per_s else None,
        "latency_s": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in lat.items()},
        "queue_ms_p50": percentile(queue, 50), "queue_ms_p95": percentile(queue, 95),
        "generate_ms_p50": percentile(gen, 50), "generate_ms_p95": percentile(gen, 95),
        "per_worker": dict(Counter(s.worker or "unknown" for s in ok)),
    }
