"""The rendered nginx against strangers, with a real nginx: its own errors are the API's JSON and never name
nginx, request ids are the ones the worker would accept, and one address trickling headers on a thousand
connections cannot keep another address waiting."""
from __future__ import annotations

import json
import re
import resource
import shutil
import socket
import time
from pathlib import Path

import pytest

from scripts.render_nginx import Options, Worker
from tests.harness.waiting import wait_until
from tests.integration.nginx_proc import EchoUpstream, Nginx, raw_request, split_response
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")]
ERROR_KEYS = {"code", "message", "field", "retryable", "type", "param"}


@pytest.fixture()
def gateway(tmp_path):
    """nginx in front of one answering worker ("live"), one port where nothing listens ("dead") and one
    worker that never answers ("hang"); 1 KiB bodies, 1 s read timeout, 1 request a minute per key."""
    live, dead, hang, port = free_port(), free_port(), free_port(), free_port()
    workers = [Worker("127.0.0.1", live, "fp4", "live"), Worker("127.0.0.1", dead, "bf16", "dead"),
               Worker("127.0.0.1", hang, "fp8", "hang")]
    opts = Options(listen=f"127.0.0.1:{port}", max_body="1k", read_timeout="1s", rate="1r/m", burst=0,
                   web_dir=str(ROOT / "web"))
    with EchoUpstream("127.0.0.1", live, "live") as up, EchoUpstream("127.0.0.1", hang, "hang", hang=True), \
            Nginx(tmp_path, workers, opts) as nginx:
        nginx.upstream = up
        yield nginx


def _assert_json_error(raw: bytes, status: int) -> dict:
    got, headers, body = split_response(raw)
    assert got == status, raw[:500]
    assert headers["content-type"].startswith("application/json"), headers
    assert b"nginx" not in raw.lower(), raw[:800]  # neither a header (Server) nor the body names it
    assert "server" not in headers, headers
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,64}", headers.get("x-request-id", "")), headers
    error = json.loads(body)["error"]
    assert ERROR_KEYS <= set(error), error
    assert error["request_id"] == headers["x-request-id"]
    return error


def _get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n".encode()


def test_every_error_nginx_makes_is_api_json_and_anonymous(gateway):
    p = gateway.port
    cases = [
        (400, b"BREW /pot HTCPCP/1.0 junk\r\n\r\n"),
        (400, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"),  # no Host
        (403, _get("/metrics")),  # from 127.0.0.2 below
        (404, _get("/jobs/nobody-123")),
        (400, _get("/images/../../etc/passwd")),  # above the root: refused before routing
        (404, _get("/images/" + "0" * 32 + ".exe")),
        (404, _get("/ui/missing.html")),
        (405, b"POST /ui/index.html HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"),
        (405, b"PUT /dashboard/workers.json HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"),
        (405, b"DELETE /dashboard/index.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        (405, b"POST /workers/live/health HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"),
        (413, b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n" + b"x" * 5000),
        (414, _get("/" + "a" * 9000)),
        (431, _get("/", "X-Big: " + "b" * 9000 + "\r\n")),
        (501, b"POST /jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\n"),
        (502, _get("/workers/dead/health")),
        (504, _get("/workers/hang/health")),
    ]
    codes = {}
    for status, request in cases:
        source = "127.0.0.2" if status == 403 else None
        codes[status] = _assert_json_error(raw_request(p, request, source=source), status)["code"]
    assert codes[413] == "payload_too_large" and codes[502] == "bad_gateway" and codes[504] == "gateway_timeout"
    # 429 from the rate limit: the first request of the address passes, the second is refused
    post = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    assert split_response(raw_request(p, post))[0] != 429
    error = _assert_json_error(raw_request(p, post), 429)
    assert error["code"] == "rate_limited" and error["retryable"] is True
    # and a worker's own answer passes through untouched (its Server header is not nginx's to show either)
    status, headers, body = split_response(raw_request(p, _get("/workers/live/health")))
    assert status == 200 and json.loads(body)["server"] == "live"


@pytest.mark.parametrize("path", ["/ui", "/dashboard"])
def test_the_pages_redirect_without_naming_nginx(gateway, path):
    raw = raw_request(gateway.port, _get(path))
    status, headers, body = split_response(raw)
    assert status == 301 and headers["location"] == path + "/", raw[:400]
    assert b"nginx" not in raw.lower(), raw[:400]
    assert headers["content-type"].startswith("application/json") and json.loads(body)["moved_to"] == path + "/"
    assert headers["x-request-id"]


def test_request_ids_are_ones_the_worker_accepts_and_the_same_everywhere(gateway):
    p = gateway.port
    for sent, kept in (("client-id_1.2", True), ("has space", False), ("x" * 65, False), ("a\"b", False),
                       ("", False)):
        extra = f"X-Request-ID: {sent}\r\n" if sent else ""
        status, headers, _ = split_response(raw_request(p, _get("/workers/live/queue-stats", extra)))
        assert status == 200
        seen = gateway.upstream.seen[-1]["request_id"]
        assert headers["x-request-id"] == seen, (headers, seen)  # nginx's id replaces the worker's own header
        assert re.fullmatch(r"[A-Za-z0-9._-]{1,64}", seen)
        assert (seen == sent) is kept
        # nginx writes its access line after the answer has gone out
        wait_until(lambda: f'"request_id":"{seen}"' in gateway.access_log(), 5, 0.05, f"the access line of {seen}")
        assert "upstream-own-id" not in headers["x-request-id"]


def test_every_access_log_line_is_a_json_object_whatever_bytes_a_client_sends(gateway):
    """escape=json escapes control characters but copies bytes >= 0x80 as they are: a User-Agent or a path that
    is not UTF-8 would make its line no JSON at all, a record a log pipeline drops (or chokes on)."""
    p = gateway.port
    requests = [
        b"GET /workers/live/health HTTP/1.1\r\nHost: x\r\nUser-Agent: bad \xff\xfe \xc3(\r\nConnection: close\r\n\r\n",
        b"GET /images/\xff\xfe.png HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /workers/live/health?q=\xed\xa0\x80 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "GET /workers/live/health?q=\u00e9t\u00e9 HTTP/1.1\r\nHost: x\r\nUser-Agent: caf\u00e9 \u2615\r\n"
        "Connection: close\r\n\r\n".encode(),
    ]
    for request in requests:
        raw_request(p, request)
    # nginx writes each access line after its answer has gone out
    wait_until(lambda: len((gateway.tmp / "access.log").read_bytes().splitlines()) >= len(requests), 5, 0.05,
               "an access line per request")
    records = [json.loads(line) for line in (gateway.tmp / "access.log").read_bytes().splitlines()]
    assert len(records) == len(requests)
    # UTF-8 is kept as it came
    assert records[3]["user_agent"] == "caf\u00e9 \u2615" and records[3]["uri"].endswith("q=\u00e9t\u00e9")
    assert "\xff" not in records[0]["user_agent"] and records[0]["status"] == 200


def test_a_thousand_slow_headers_from_one_address_never_stall_another(gateway):
    """Slowloris: 127.0.0.1 opens many connections and trickles header lines; 127.0.0.2 is answered at once,
    and nginx drops the tricklers after client_header_timeout (10 s) instead of waiting forever."""
    count = 1200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, count + 512)), hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < count + 256:
        pytest.skip("cannot open enough files")
    slow: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        started = time.monotonic()
        for round_ in range(14):
            for s in slow:
                try:
                    s.send(b"X-a: b\r\n")
                except OSError:
                    pass
            t0 = time.monotonic()
            status, _, body = split_response(
                raw_request(gateway.port, _get("/workers/live/health"), timeout=5, source="127.0.0.2"))
            assert status == 200 and time.monotonic() - t0 < 2, (round_, status, body)
            time.sleep(1)
        # the tricklers were closed by nginx, about client_header_timeout after they began
        closed = 0
        for s in slow:
            s.settimeout(0.01)
            try:
                closed += s.recv(1) == b""
            except (ConnectionResetError, BrokenPipeError):
                closed += 1
            except (socket.timeout, BlockingIOError):
                pass
        assert closed >= count * 0.95, (closed, time.monotonic() - started)
    finally:
        for s in slow:
            s.close()


def test_one_address_holds_at_most_its_share_of_requests(gateway):
    """Requests waiting on a worker count against their address (limit_conn 256): beyond it nginx answers 429
    JSON at once, and another address is still served."""
    held: list[socket.socket] = []
    try:
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
            s.sendall(b"GET /workers/hang/health HTTP/1.1\r\nHost: x\r\n\r\n")
            held.append(s)
        refused = 0
        for s in held[256:]:
            s.settimeout(0.5)
            try:
                head = s.recv(4096)
            except socket.timeout:
                continue
            refused += head.startswith(b"HTTP/1.1 429")
        assert refused >= 40, refused
        status, _, _ = split_response(raw_request(gateway.port, _get("/workers/live/health"), source="127.0.0.2"))
        assert status == 200
    finally:
        for s in held:
            s.close()
