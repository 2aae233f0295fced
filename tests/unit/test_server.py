"""A real uvicorn server (in a thread, real sockets): client disconnects, the SIGTERM drain, raw request paths."""
from __future__ import annotations

import http.client
import json
import signal
import socket

import httpx
import pytest

from api.app import create_app
from api.server import DrainingServer
from tests.clients import Background, wait_for
from tests.unit.support import (SMALL, FailingPipe, GatedEngine, PreloadedEngine, ThreadedServer, make_settings,
                                png_image)


def stats(server: ThreadedServer) -> dict:
    return httpx.get(f"{server.base_url}/queue-stats").json()


def send_and_hang_up_later(port: int, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


@pytest.fixture
def gated_server(bf16_engine, tmp_path):
    engine = GatedEngine(bf16_engine, closed=True)
    app = create_app(make_settings(tmp_path, max_concurrent=1, drain_timeout_s=20), engine)
    server = ThreadedServer(app, DrainingServer, runtime=app.state.runtime).start()
    try:
        server.wait_ready()
        yield server, engine
    finally:
        engine.gate.set()
        server.stop()


def test_a_client_that_hangs_up_while_queued_never_reaches_the_engine(gated_server):
    server, engine = gated_server
    running = Background(server.base_url, SMALL)
    assert engine.entered.wait(10)
    sock = send_and_hang_up_later(server.port, dict(SMALL, seed=99))
    wait_for(lambda: stats(server)["queued"] == 1)
    sock.close()
    after = wait_for(lambda: (s := stats(server))["cancelled"] == 1 and s)
    assert after["queued"] == 0
    engine.gate.set()
    assert running.result().status_code == 200
    assert [[s.seed for s in batch] for batch in engine.batches] == [[7]]
    assert stats(server)["completed"] == 1


def test_sigterm_drains_in_flight_and_queued_work_then_exits_cleanly(gated_server):
    server, engine = gated_server
    running = Background(server.base_url, SMALL)
    assert engine.entered.wait(10)
    queued = Background(server.base_url, dict(SMALL, seed=8, width=320))
    wait_for(lambda: stats(server)["queued"] == 1)

    server.call_in_loop(server.server.handle_exit, signal.SIGTERM, None)
    health = wait_for(lambda: (r := httpx.get(f"{server.base_url}/health")).json()["status"] == "draining" and r)
    assert health.status_code == 503
    refused = httpx.post(f"{server.base_url}/generate", json=dict(SMALL, seed=9))
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    assert refused.headers["retry-after"] == "1"
    assert server.thread.is_alive(), "the server exited with work on the GPU"

    engine.gate.set()
    first, second = running.result(), queued.result()
    assert (first.status_code, second.status_code) == (200, 200)
    server.thread.join(20)
    assert not server.thread.is_alive(), "the server did not exit after draining"
    assert server.server.exit_code == 0
    assert [[s.seed for s in batch] for batch in engine.batches] == [[7], [8]]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.base_url}/live")


def test_a_sticky_cuda_error_makes_the_server_exit_for_a_restart(bf16_engine, tmp_path):
    engine = PreloadedEngine(bf16_engine)
    engine.pipe = FailingPipe(bf16_engine.pipe, lambda: RuntimeError("CUDA error: device-side assert triggered"))
    app = create_app(make_settings(tmp_path), engine)
    server = ThreadedServer(app, DrainingServer, runtime=app.state.runtime).start()
    try:
        server.wait_ready()
        response = httpx.post(f"{server.base_url}/generate", json=SMALL, timeout=30)
        assert response.status_code == 500
        server.thread.join(10)
        assert not server.thread.is_alive(), "a worker with a broken GPU context kept running"
        assert server.server.exit_code == 3
    finally:
        server.stop()


@pytest.mark.parametrize("path", [
    "/images/../pytest.ini", "/images/../../etc/passwd", "/images/..%2f..%2fpytest.ini", "/images/%2e%2e",
    "/images/%2e%2e%2fsecret.png", "/images/%2E%2E/secret.png", "/images/..%5csecret.png", "/images/....//secret.png",
    "/images//etc/passwd", "/images/%2fetc%2fpasswd", "/images/secret.png", "/images/secret.png%00.png",
])
def test_raw_traversal_paths_are_404_on_a_real_server(bf16_engine, tmp_path, path):
    app = create_app(make_settings(tmp_path), PreloadedEngine(bf16_engine))
    server = ThreadedServer(app).start()
    try:
        server.wait_ready()
        (tmp_path / "secret.png").write_bytes(b"top secret")
        (tmp_path / "images" / "secret.png").write_bytes(b"top secret")
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.putrequest("GET", path, skip_accept_encoding=True)  # sent byte for byte, no normalisation
        conn.endheaders()
        response = conn.getresponse()
        body = response.read()
        conn.close()
        assert response.status == 404, (path, body)
        assert json.loads(body)["error"]["code"] == "not_found"
        assert b"top secret" not in body and b"[pytest]" not in body and b"root:" not in body
    finally:
        server.stop()


def test_a_generated_image_is_served_over_a_real_socket(bf16_engine, tmp_path):
    app = create_app(make_settings(tmp_path), PreloadedEngine(bf16_engine))
    server = ThreadedServer(app).start()
    try:
        server.wait_ready()
        body = httpx.post(f"{server.base_url}/generate", json=SMALL, timeout=30).json()
        assert body["image_url"].startswith(f"http://127.0.0.1:{server.port}/images/")
        image = httpx.get(body["image_url"])
        assert image.status_code == 200
        assert png_image(image.content).size == (256, 256)
    finally:
        server.stop()
