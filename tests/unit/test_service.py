"""The service layer in process, over the real dummy:tiny pipeline: all-or-nothing admission of n images,
siblings cancelled when one fails, jobs visible only to their API key, shared waits under one
Idempotency-Key, the caps on event streams, and the typed worker state."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid

import httpx
import pytest

from api.app import create_app
from api.server import DrainingServer
from tests.unit.support import (SMALL, FailingPipe, GatedEngine, PreloadedEngine, ThreadedServer, assert_json_error,
                                make_settings, queue_stats, serve, wait_until)

pytestmark = pytest.mark.anyio

OPENAI = {"prompt": "three foxes", "size": "256x256", "n": 3, "seed": 5}
KEYS = "key-a,key-b"


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


async def test_openai_n_images_are_admitted_all_or_none(bf16_engine, tmp_path):
    engine = GatedEngine(bf16_engine, closed=True)
    app = create_app(make_settings(tmp_path, max_concurrent=1, max_queue_size=2), engine)
    async with serve(app) as http:
        try:
            running = asyncio.create_task(http.post("/generate", json=SMALL))
            assert await asyncio.to_thread(engine.entered.wait, 10)
            # room for 2 waiting jobs, 3 asked for: refused whole, nothing left in the queue
            refused = await http.post("/v1/images/generations", json=OPENAI)
            assert_json_error(refused, 503, "queue_full")
            stats = await queue_stats(http)
            assert (stats["queued"], stats["running"]) == (0, 1), stats
            # two fit: both admitted
            accepted = asyncio.create_task(http.post("/v1/images/generations", json=dict(OPENAI, n=2)))
            await wait_until(_queued(http, 2))
        finally:
            engine.gate.set()
        assert (await running).status_code == 200
        response = await accepted
        assert response.status_code == 200, response.text
        assert len(response.json()["data"]) == 2
        assert [spec.seed for batch in engine.batches for spec in batch] == [7, 5, 6]


def _queued(http, n):
    async def check():
        return (await queue_stats(http))["queued"] == n
    return check


async def test_one_failed_image_cancels_its_siblings(bf16_engine, tmp_path):
    engine = PreloadedEngine(bf16_engine)
    engine.pipe = FailingPipe(engine.pipe, lambda: RuntimeError("the first image breaks"), times=1)
    app = create_app(make_settings(tmp_path, max_concurrent=1), engine)
    async with serve(app) as http:
        response = await http.post("/v1/images/generations",
                                   json=dict(OPENAI, n=3, size="512x512", seed=1))
        error = assert_json_error(response, 500, "generation_failed")
        assert error["retryable"] is False
        await wait_until(_idle(http))
        stats = await queue_stats(http)
        # the failed image and its two cancelled siblings; no image was made for a request that failed
        assert (stats["failed"], stats["cancelled"], stats["completed"]) == (1, 2, 0), stats


def _idle(http):
    async def check():
        s = await queue_stats(http)
        return s["queued"] == 0 and s["running"] == 0
    return check


async def test_a_job_is_visible_only_to_the_key_that_made_it(bf16_engine, tmp_path):
    engine = GatedEngine(bf16_engine, closed=True)
    app = create_app(make_settings(tmp_path, api_keys=KEYS), engine)
    async with serve(app) as http:
        try:
            created = await http.post("/jobs", json=SMALL, headers=bearer("key-a"))
            assert created.status_code == 202, created.text
            job_id = created.json()["job_id"]
            unknown_id = job_id[:-4] + ("0000" if not job_id.endswith("0000") else "1111")
            for method, suffix in (("GET", ""), ("DELETE", ""), ("GET", "/events")):
                theirs = await http.request(method, f"/jobs/{job_id}{suffix}", headers=bearer("key-b"))
                missing = await http.request(method, f"/jobs/{unknown_id}{suffix}", headers=bearer("key-b"))
                assert_json_error(theirs, 404, "not_found", "job_id")
                a, b = theirs.json()["error"], missing.json()["error"]
                for body in (a, b):
                    body.pop("request_id")
                assert a == json.loads(json.dumps(b).replace(unknown_id, job_id)), (a, b)
            # key b's DELETE did nothing; key a still sees its job, and can cancel it
            mine = await http.get(f"/jobs/{job_id}", headers=bearer("key-a"))
            assert mine.status_code == 200 and mine.json()["status"] in ("queued", "running")
            assert (await http.delete(f"/jobs/{job_id}", headers=bearer("key-a"))).status_code == 200
        finally:
            engine.gate.set()


async def test_without_keys_everyone_shares_the_jobs(bf16_engine, tmp_path):
    app = create_app(make_settings(tmp_path), PreloadedEngine(bf16_engine))
    async with serve(app, peer=("10.0.0.1", 1)) as first:
        job_id = (await first.post("/jobs", json=SMALL)).json()["job_id"]
        transport = httpx.ASGITransport(app=app, client=("10.0.0.2", 2))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as other:
            assert (await other.get(f"/jobs/{job_id}")).status_code == 200


def test_worker_state_is_an_enum_with_the_json_values(bf16_engine, tmp_path):
    from api.runtime import WorkerState

    app = create_app(make_settings(tmp_path), PreloadedEngine(bf16_engine))
    rt = app.state.runtime
    assert rt.state is WorkerState.loading and json.dumps({"s": rt.state}) == '{"s": "loading"}'
    rt.set_state("draining")
    assert rt.state is WorkerState.draining and f"{rt.state}" == "draining"
    with pytest.raises(ValueError):
        rt.set_state("sleeping")


# ---- real sockets: disconnects and streams ---------------------------------------------------------
@pytest.fixture
def gated_server(bf16_engine, tmp_path):
    def start(**settings):
        engine = GatedEngine(bf16_engine, closed=True)
        app = create_app(make_settings(tmp_path, max_concurrent=1, **settings), engine)
        server = ThreadedServer(app, DrainingServer, runtime=app.state.runtime).start()
        server.wait_ready()
        started.append((server, engine))
        return server, engine

    started = []
    yield start
    for server, engine in started:
        engine.gate.set()
        server.stop()


def _raw_post(port: int, path: str, body: dict, headers: dict | None = None) -> socket.socket:
    data = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n%s"
                 b"Content-Length: %d\r\n\r\n%s" % (path.encode(), extra, len(data), data))
    return sock


def _wait(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.02)


def test_a_duplicate_that_hangs_up_does_not_cancel_the_original(gated_server):
    server, engine = gated_server()
    stats = lambda: httpx.get(f"{server.base_url}/queue-stats").json()  # noqa: E731
    blocker = _raw_post(server.port, "/generate", SMALL)
    assert engine.entered.wait(10)
    key = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    body = dict(SMALL, seed=42)
    result = {}
    original = threading.Thread(target=lambda: result.update(
        r=httpx.post(f"{server.base_url}/generate", json=body, headers=key, timeout=60)))
    original.start()
    _wait(lambda: stats()["queued"] == 1)
    duplicate = _raw_post(server.port, "/generate", body, key)
    time.sleep(0.3)  # the duplicate is waiting on the same job now
    duplicate.close()
    time.sleep(0.3)
    assert stats()["queued"] == 1 and stats()["cancelled"] == 0, "the duplicate's hang-up cancelled the job"
    engine.gate.set()
    original.join(30)
    assert result["r"].status_code == 200, result["r"].text
    assert result["r"].json()["seed"] == 42
    blocker.close()


def test_the_last_waiter_to_hang_up_cancels_the_job(gated_server):
    server, engine = gated_server()
    stats = lambda: httpx.get(f"{server.base_url}/queue-stats").json()  # noqa: E731
    blocker = _raw_post(server.port, "/generate", SMALL)
    assert engine.entered.wait(10)
    key = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    first = _raw_post(server.port, "/generate", dict(SMALL, seed=43), key)
    _wait(lambda: stats()["queued"] == 1)
    second = _raw_post(server.port, "/generate", dict(SMALL, seed=43), key)
    time.sleep(0.3)
    first.close()
    second.close()
    _wait(lambda: stats()["queued"] == 0 and stats()["cancelled"] == 1)
    engine.gate.set()
    blocker.close()


def _open_stream(base_url: str, job_id: str, headers=None):
    client = httpx.Client(base_url=base_url, timeout=10)
    response = client.send(client.build_request("GET", f"/jobs/{job_id}/events", headers=headers), stream=True)
    return client, response


@pytest.mark.parametrize("limit", ["max_event_streams", "max_event_streams_per_key"])
def test_event_streams_past_the_cap_are_429(gated_server, limit):
    server, engine = gated_server(**{limit: 2})
    job_id = httpx.post(f"{server.base_url}/jobs", json=SMALL).json()["job_id"]
    assert engine.entered.wait(10)
    open_streams = [_open_stream(server.base_url, job_id) for _ in range(2)]
    try:
        assert all(r.status_code == 200 for _, r in open_streams)
        refused = httpx.get(f"{server.base_url}/jobs/{job_id}/events", timeout=10)
        error = assert_json_error(refused, 429, "too_many_streams")
        assert error["retryable"] is True and int(refused.headers["retry-after"]) >= 1
        # a closed stream gives its slot back
        client, response = open_streams.pop()
        response.close()
        client.close()
        _wait(lambda: httpx.get(f"{server.base_url}/queue-stats").json()["event_streams"] == 1)
        again = _open_stream(server.base_url, job_id)
        open_streams.append(again)
        assert again[1].status_code == 200
    finally:
        for client, response in open_streams:
            response.close()
            client.close()


@pytest.mark.parametrize("trusted,split", [("127.0.0.1,::1", True), ("10.9.9.9", False)],
                         ids=["behind-our-nginx", "x-real-ip-from-an-untrusted-peer"])
def test_without_keys_the_stream_cap_counts_the_client_nginx_names(gated_server, trusted, split):
    # Behind nginx every stream comes from nginx's address: counted by the TCP peer, one stranger's idle streams
    # would lock every other client out. nginx sets X-Real-IP to the client's address (replacing any the client
    # sent); it is believed only from a trusted proxy, so nobody else can mint addresses.
    server, engine = gated_server(max_event_streams_per_key=1, trusted_proxies=trusted)
    job_id = httpx.post(f"{server.base_url}/jobs", json=SMALL).json()["job_id"]
    streams = []

    def status(real_ip: str) -> int:
        streams.append(_open_stream(server.base_url, job_id, {"X-Real-IP": real_ip}))
        return streams[-1][1].status_code

    try:
        assert status("203.0.113.7") == 200
        assert status("203.0.113.7") == 429
        assert status("198.51.100.9") == (200 if split else 429)
        assert status("not-an-address") == (200 if split else 429)  # an invalid X-Real-IP is the peer's own
    finally:
        for client, response in streams:
            response.close()
            client.close()


def test_the_per_key_stream_cap_counts_each_key_apart(gated_server):
    server, engine = gated_server(api_keys=KEYS, max_event_streams_per_key=1)
    a_job = httpx.post(f"{server.base_url}/jobs", json=SMALL, headers=bearer("key-a")).json()["job_id"]
    b_job = httpx.post(f"{server.base_url}/jobs", json=SMALL, headers=bearer("key-b")).json()["job_id"]
    streams = [_open_stream(server.base_url, a_job, bearer("key-a"))]
    try:
        refused = httpx.get(f"{server.base_url}/jobs/{a_job}/events", headers=bearer("key-a"), timeout=10)
        assert_json_error(refused, 429, "too_many_streams")
        streams.append(_open_stream(server.base_url, b_job, bearer("key-b")))
        assert streams[-1][1].status_code == 200
    finally:
        for client, response in streams:
            response.close()
            client.close()


async def test_a_dead_scheduler_fails_every_pending_job_and_health(bf16_engine, tmp_path):
    engine = GatedEngine(bf16_engine, closed=True)
    app = create_app(make_settings(tmp_path, max_concurrent=1, request_timeout_s=600), engine)
    async with serve(app) as http:
        rt = app.state.runtime
        waiting = asyncio.create_task(http.post("/generate", json=SMALL))
        assert await asyncio.to_thread(engine.entered.wait, 10)
        queued = (await http.post("/jobs", json=dict(SMALL, seed=8))).json()["job_id"]

        def bookkeeping_bug(*args):  # any exception that escapes the scheduler task
            raise KeyError("planted")

        rt.queue._record_success = bookkeeping_bug
        engine.gate.set()
        response = await asyncio.wait_for(waiting, 10)  # now, not at the 600 s deadline
        error = assert_json_error(response, 503, "worker_failed")
        assert error["retryable"] is True and response.headers["retry-after"]
        view = (await http.get(f"/jobs/{queued}")).json()
        assert view["status"] == "failed" and view["error"]["code"] == "worker_failed", view
        health = await http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert_json_error(await http.post("/generate", json=SMALL), 503, "not_ready")
        assert rt.queue.fatal_error  # what api/server.py reads to exit 3
