"""Idle event streams against a real worker process: hundreds of open GET /jobs/{id}/events streams cost a
render next to nothing and leave the API responsive (each stream awaits its job's change event; nothing
polls). The 3,000-stream figure through nginx comes from `python -m bench.idle_streams` (docs/OPERATIONS.md)."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from bench.idle_streams import measure, open_streams, raise_open_file_limit
from tests.production.conftest import QUICK_JOB, Worker, sse_events, start_all

STREAMS = 400
MEASURED = {"prompt": "measured", "width": 512, "height": 512, "num_inference_steps": 12, "seed": 3}


@pytest.fixture(scope="module")
def stream_worker(workdir):
    w = Worker("streams", workdir, {"FLUX_MAX_CONCURRENT": "1", "FLUX_MAX_EVENT_STREAMS_PER_KEY": "5000"})
    start_all(w)
    yield w
    w.stop()


@pytest.mark.timeout(600)
def test_idle_streams_do_not_slow_a_render(stream_worker):
    raise_open_file_limit()
    rows = asyncio.run(measure(stream_worker.url, [0, STREAMS], runs=3, body=MEASURED))
    base, loaded = rows
    assert loaded["render_s"] <= base["render_s"] * 1.15, rows
    # the API answers while they are open: a GET never waits behind the streams
    assert loaded["get_p50_ms"] < 100 and loaded["get_max_ms"] < 1000, rows


def test_a_stream_sees_every_state_and_ends(stream_worker):
    w = stream_worker
    job_id = w.client.post("/jobs", json=dict(QUICK_JOB, num_inference_steps=4)).json()["job_id"]
    with w.client.stream("GET", f"/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.iter_lines())
    names = [name for name, _ in events]
    assert names[-2:] == ["succeeded", "done"], names
    assert events[-2][1]["result"]["job_id"] == job_id


def test_streams_end_when_their_clients_leave(stream_worker):
    """A stream's slot is given back when its client goes, not at its next keep-alive."""
    w = stream_worker
    blocker = w.client.post("/jobs", json=dict(QUICK_JOB, width=1024, height=1024, num_inference_steps=100))
    job_id = blocker.json()["job_id"]
    try:
        async def open_and_close():
            streams = await open_streams(w.url, job_id, 50)
            assert w.stats()["event_streams"] == 50
            for _, writer in streams:
                writer.close()

        asyncio.run(open_and_close())
        for _ in range(100):
            if w.stats()["event_streams"] == 0:
                break
            asyncio.run(asyncio.sleep(0.05))
        assert w.stats()["event_streams"] == 0
    finally:
        httpx.delete(f"{w.url}/jobs/{job_id}", timeout=30)
