"""A bug's exception on a real uvicorn server: a 500 JSON error, and the kept-alive connection stays usable.

nginx keeps connections to a worker open and sends other clients' requests over them; a connection reset after
one client's 500 would turn the next client's request into a 502.
"""
from __future__ import annotations

import json
import socket

import pytest

from api.app import create_app
from api.server import DrainingServer
from tests.unit.support import PreloadedEngine, ThreadedServer, make_settings


def read_response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the server closed the connection (read so far: {data[:200]!r})")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = int(next(line.split(":", 1)[1] for line in lines if line.lower().startswith("content-length:")))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection mid-body")
        body += chunk
    return int(lines[0].split()[1]), json.loads(body[:length])


@pytest.fixture
def server(bf16_engine, tmp_path):
    app = create_app(make_settings(tmp_path), PreloadedEngine(bf16_engine))

    @app.get("/planted-bug")  # a fault injected in a real app: any handler's unexpected exception
    async def planted_bug():
        raise RuntimeError("a bug in /secret/path.py")

    srv = ThreadedServer(app, DrainingServer, runtime=app.state.runtime).start()
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_an_unexpected_exception_is_a_500_json_error_and_the_connection_serves_the_next_request(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /planted-bug HTTP/1.1\r\nHost: w\r\n\r\n")
        status, body = read_response(sock)
        assert status == 500
        assert body["error"]["code"] == "internal_error" and body["error"]["request_id"]
        assert "secret" not in json.dumps(body)
        sock.sendall(b"GET /live HTTP/1.1\r\nHost: w\r\n\r\n")  # the next request on the same connection
        status, _ = read_response(sock)
        assert status == 200
