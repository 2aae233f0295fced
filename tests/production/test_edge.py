"""The worker's edge, against real worker processes over raw sockets: slow clients, clients hanging up mid-body,
log lines no client can forge, image URLs no client can steer, image files no one but the service made.

The `edge` worker runs with 1 s header and body bounds and trusts no local proxy (FLUX_TRUSTED_PROXIES names an
address no test connects from), so every connection from the tests is an untrusted stranger's.
"""
from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.parse

import pytest

from api.middleware import REQUEST_ID_RE
from tests.harness.asserts import assert_error, assert_png
from tests.harness.process import Worker, start_all
from tests.harness.rawhttp import closed_within, exchange, post_json_request, read_response
from tests.harness.waiting import wait_until

HEADER_S = BODY_S = 1.0
QUICK = json.dumps({"prompt": "an edge case", "width": 256, "height": 256, "num_inference_steps": 1}).encode()
# every log record starts like this (api/logs.py FORMAT); a line that does not is a traceback line of ours
RECORD_RE = re.compile(rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
TRACEBACK_LINE_RE = re.compile(rb"^(Traceback \(most recent call last\):|  File \"|    |\S+(Error|Exception)\b|"
                               rb"During handling|The above exception|$)")


@pytest.fixture(scope="module")
def edge(workdir):
    w = Worker("edge", workdir, {"FLUX_HEADER_TIMEOUT_S": str(HEADER_S), "FLUX_BODY_TIMEOUT_S": str(BODY_S),
                                 "FLUX_TRUSTED_PROXIES": "10.9.9.9"})
    start_all(w)
    yield w
    w.stop()


def requests_counted(worker: Worker, route: str, status: int) -> float:
    text = worker.client.get("/metrics").text
    pattern = re.compile(r'^flux_http_requests_total\{([^}]*)\} (\S+)$', re.M)
    total = 0.0
    for labels, value in pattern.findall(text):
        if f'route="{route}"' in labels and f'status="{status}"' in labels:
            total += float(value)
    return total


# ---- 1. slow connections ------------------------------------------------------------------------------
def test_a_connection_that_sends_nothing_is_closed(edge):
    with edge.connect() as sock:
        started = time.monotonic()
        assert closed_within(sock, HEADER_S + 4), "an idle new connection was kept open"
        assert time.monotonic() - started >= HEADER_S * 0.8


def test_a_header_sent_a_byte_at_a_time_is_bounded_in_total_not_per_byte(edge):
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40
    with edge.connect() as sock:
        started = time.monotonic()
        closed = False
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            if time.monotonic() - started > HEADER_S + 4:
                break
            time.sleep(0.1)
        closed = closed or closed_within(sock, 0.5)
        assert closed, "a header trickling in a byte every 0.1 s kept the connection open"
        assert time.monotonic() - started < HEADER_S + 4


def test_a_stalled_body_is_answered_408_and_the_connection_closed(edge):
    with edge.connect() as sock:
        sock.sendall(post_json_request("/generate", QUICK, {"Host": "edge.test", "X-Request-ID": "slow-body-1"})
                     [:-len(QUICK) + 5])  # the headers and 5 bytes of the body
        started = time.monotonic()
        sock.settimeout(BODY_S + 10)
        resp = read_response(sock)
        assert resp is not None and resp.status == 408, resp
        assert time.monotonic() - started < BODY_S + 5
        error = resp.json()["error"]
        assert (error["code"], error["field"], error["request_id"]) == ("request_timeout", "body", "slow-body-1")
        assert resp.headers["x-request-id"] == "slow-body-1"
        assert resp.headers.get("connection") == "close"
        assert closed_within(sock, 2)


def test_a_body_that_keeps_coming_is_not_cut_and_a_complete_request_on_a_kept_alive_connection_works(edge):
    request = post_json_request("/generate", QUICK, {"Host": "edge.test"})
    head, body = request[:-len(QUICK)], request[-len(QUICK):]
    with edge.connect(timeout=60) as sock:
        sock.sendall(head)
        for i in range(0, len(body), 20):  # each piece well within the bound, the whole beyond it
            time.sleep(0.3)
            sock.sendall(body[i:i + 20])
        resp = read_response(sock)
        assert resp.status == 200, resp
        sock.sendall(b"GET /live HTTP/1.1\r\nHost: edge.test\r\n\r\n")
        assert read_response(sock).json() == {"status": "alive"}


# ---- 2. a client hanging up mid-body -----------------------------------------------------------------
def test_a_client_hanging_up_mid_body_is_a_499_not_a_500(edge):
    before = requests_counted(edge, "/generate", 499)
    errors_before = requests_counted(edge, "/generate", 500)
    with edge.connect() as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: edge.test\r\nContent-Type: application/json\r\n"
                     b"X-Request-ID: hangs-up-1\r\nContent-Length: 1000\r\n\r\n" + b'{"prompt":')
        time.sleep(0.2)
    wait_until(lambda: requests_counted(edge, "/generate", 499) == before + 1, 10, what="the 499 to be counted")
    assert requests_counted(edge, "/generate", 500) == errors_before
    line = wait_until(lambda: [ln for ln in edge.log_text().splitlines() if "request_id=hangs-up-1" in ln], 10)
    assert "status=499" in line[0], line
    log = edge.log_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


# ---- 3. log lines no client can forge ----------------------------------------------------------------
HOSTILE = [
    "/nope%0a2026-01-01 00:00:00,000 ERROR flux.queue: forged%0d%0aTraceback (most recent call last):",
    "/nope%0dcarriage",
    "/nope%1b[31mred%1b[0m%1b]0;title%07",
    "/nope%00nul%7fdel%c2%85nel%c2%9bcsi",
    "/nope%e2%80%a8ls%e2%80%a9ps%e2%80%aertl",
    "/images/%0aERROR forged.png",
    "/jobs/x%0aERROR%20forged",
]


def test_client_strings_cannot_forge_log_lines_or_reach_the_terminal(edge):
    marker = "hostile-%d" % time.monotonic_ns()
    offset = len(edge.log_bytes())  # what the worker logs from here on (not third-party import-time noise)
    for n, path in enumerate(HOSTILE):
        resp = exchange(edge.port, f"GET {path.replace(' ', '%20')}?q=%0aERROR HTTP/1.1\r\nHost: edge.test\r\n"
                        f"X-Request-ID: {marker}-{n}\r\nUser-Agent: ua%0a\r\nConnection: close\r\n\r\n"
                        .encode("latin-1"), timeout=10)
        assert resp is not None and resp.status in (404, 422), (path, resp)
    # raw control bytes where the parser lets them through (a header value with ESC, a request line with DEL)
    for raw in (b"GET /nope\x7f HTTP/1.1\r\nHost: edge.test\r\nConnection: close\r\n\r\n",
                b"GET /nope HTTP/1.1\r\nHost: edge.test\r\nX-Request-ID: a\x1b[31mb\r\nConnection: close\r\n\r\n",
                b"GET /nope\r\nERROR HTTP/1.1\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", edge.port), timeout=10) as sock:
            sock.sendall(raw)
            closed_within(sock, 5)
    wait_until(lambda: sum(f"request_id={marker}-" in ln for ln in edge.log_text().splitlines()) == len(HOSTILE),
               10, what="an access line per hostile request")

    raw_log = edge.log_bytes()[offset:]
    for line in raw_log.split(b"\n"):
        assert RECORD_RE.match(line) or TRACEBACK_LINE_RE.match(line), f"a line that is no record: {line!r}"
        assert not re.search(rb"[\x00-\x1f\x7f]", line), f"control byte in the log: {line!r}"
        text = line.decode("utf-8")
        assert not re.search("[\u0080-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]", text), repr(text)
        if marker.encode() in line:
            assert RECORD_RE.match(line).group(1) == b"INFO", line
    # the client's bytes are there, visibly escaped, on the one access line of their request
    first = next(ln for ln in raw_log.split(b"\n") if f"request_id={marker}-0 ".encode() in ln)
    assert b"path=/nope\\x0a2026-01-01 00:00:00,000 ERROR flux.queue: forged\\x0d\\x0aTraceback (" in first
    third = next(ln for ln in raw_log.split(b"\n") if f"request_id={marker}-2 ".encode() in ln)
    assert b"\\x1b[31mred" in third


# ---- 4. image URLs -----------------------------------------------------------------------------------
def generate_url(port: int, headers: dict[str, str], version: str = "HTTP/1.1") -> str:
    resp = exchange(port, post_json_request("/generate", QUICK, dict(headers, Connection="close"), version))
    assert resp is not None and resp.status == 200, resp
    return resp.json()["image_url"]


IMAGE_PATH = re.compile(r"/images/[A-Za-z0-9_]+-[0-9a-f]{32}\.png")  # the worker id, then the name


def test_http10_without_host_gets_a_relative_url_never_the_workers_address(edge):
    url = generate_url(edge.port, {}, "HTTP/1.0")
    assert IMAGE_PATH.fullmatch(url), url
    assert_png(edge.client.get(url).content)


@pytest.mark.parametrize("host", ["evil.example/x?y=", "a b", "user@evil.example", "evil.example:99999", "[zz]",
                                  "\"><script>", "-"])
def test_a_host_header_that_is_no_host_gets_a_relative_url(edge, host):
    url = generate_url(edge.port, {"Host": host})
    assert IMAGE_PATH.fullmatch(url), (host, url)


def test_forwarded_headers_from_an_untrusted_peer_are_ignored(edge):
    url = generate_url(edge.port, {"Host": "api.example.com:8080", "X-Forwarded-Host": "evil.example",
                                   "X-Forwarded-Proto": "javascript"})
    assert re.fullmatch(r"http://api\.example\.com:8080/images/[A-Za-z0-9_]+-[0-9a-f]{32}\.png", url), url


def test_forwarded_headers_from_a_trusted_peer_are_checked(worker):
    # the shared worker trusts 127.0.0.1 (the default FLUX_TRUSTED_PROXIES)
    good = generate_url(worker.port, {"Host": "w", "X-Forwarded-Host": "cdn.example.com",
                                      "X-Forwarded-Proto": "https"})
    assert good.startswith("https://cdn.example.com/images/"), good
    bad_proto = generate_url(worker.port, {"Host": "w:1", "X-Forwarded-Host": "cdn.example.com",
                                           "X-Forwarded-Proto": "javascript"})
    assert bad_proto.startswith("http://cdn.example.com/images/"), bad_proto  # the scheme falls back, alone
    bad_host = generate_url(worker.port, {"Host": "w:1", "X-Forwarded-Host": "evil.example/@x"})
    assert bad_host.startswith("http://w:1/images/"), bad_host
    tls_proxy = generate_url(worker.port, {"Host": "api.example.com", "X-Forwarded-Proto": "https"})
    assert tls_proxy.startswith("https://api.example.com/images/"), tls_proxy
    no_host = generate_url(worker.port, {"X-Forwarded-Host": "a b"}, "HTTP/1.0")
    assert IMAGE_PATH.fullmatch(no_host), no_host


# ---- 5. image files ----------------------------------------------------------------------------------
def test_only_regular_files_under_service_names_are_served(edge, tmp_path):
    url = generate_url(edge.port, {"Host": "edge.test"})
    real = edge.output_dir / url.rsplit("/", 1)[1]
    secret = tmp_path / "secret.png"
    secret.write_bytes(real.read_bytes())
    planted = {
        "link_out": ("ab" * 16 + ".png", lambda p: os.symlink(secret, p)),
        "link_in": ("cd" * 16 + ".png", lambda p: os.symlink(real, p)),  # even to one of our own images
        "folder": ("ef" * 16 + ".png", lambda p: p.mkdir()),
        "fifo": ("0a" * 16 + ".png", lambda p: os.mkfifo(p)),
        "foreign_name": ("notes.png", lambda p: p.write_bytes(real.read_bytes())),
        "upper_hex": ("AB" * 16 + ".png", lambda p: p.write_bytes(real.read_bytes())),
        "temp_file": (".tmp-" + "12" * 16 + ".png", lambda p: p.write_bytes(real.read_bytes())),
    }
    for name, make in planted.values():
        make(edge.output_dir / name)
    try:
        for kind, (name, _) in planted.items():
            resp = edge.client.get(f"/images/{urllib.parse.quote(name)}", timeout=10)
            assert_error(resp, 404, "not_found")
    finally:
        for name, _ in planted.values():
            path = edge.output_dir / name
            path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()

    resp = edge.client.get(f"/images/{real.name}", headers={"X-Request-ID": "img-1"})
    assert resp.status_code == 200 and resp.content == real.read_bytes()
    assert resp.headers["content-type"] == "image/png"
    assert resp.headers["cache-control"] == "public, max-age=86400, immutable"
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["content-length"] == str(len(resp.content))
    assert resp.headers["x-request-id"] == "img-1"


# ---- 6. request ids ----------------------------------------------------------------------------------
@pytest.mark.parametrize("incoming, kept", [("abc-DEF_1.2", True), ("x" * 64, True), ("x" * 65, False),
                                            ("a b", False), ("a/b", False), ("", False), ("é", False)])
def test_request_id_is_kept_only_when_it_matches_the_one_rule(edge, incoming, kept):
    assert bool(REQUEST_ID_RE.match(incoming)) == kept
    resp = exchange(edge.port, f"GET /live HTTP/1.1\r\nHost: e\r\nX-Request-ID: {incoming}\r\n"
                    f"Connection: close\r\n\r\n".encode("utf-8"), timeout=10)
    echoed = resp.headers["x-request-id"]
    assert (echoed == incoming) == kept, echoed
    assert REQUEST_ID_RE.match(echoed)


@pytest.mark.parametrize("raw", [
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Request-ID: a\x1bb\r\n\r\n",  # a control byte in a header value
    b"GET /health HTTP/1.1\r\nHost: x\r\nUser-Agent: \x07\x1b[2J\r\n\r\n",
    b"GET /he\x01alth HTTP/1.1\r\nHost: x\r\n\r\n",  # and in the target
    b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # a broken chunk size
], ids=["esc-in-request-id", "bell-in-user-agent", "control-in-path", "two-content-lengths", "bad-chunk"])
def test_a_request_the_parser_refuses_is_a_400_json_error(edge, raw):
    # nginx passes such bytes on (it accepts any byte but NUL, CR and LF in a header value), so this answer
    # reaches clients through the balancer too: it must be the API's error, with a request id.
    resp = exchange(edge.port, raw)
    assert resp is not None
    assert resp.status == 400, resp.body[:200]
    assert resp.headers["content-type"] == "application/json"
    error = assert_error_body(resp)
    assert error["code"] == "bad_request"
    assert REQUEST_ID_RE.match(resp.headers["x-request-id"]) and error["request_id"] == resp.headers["x-request-id"]


def test_a_refused_request_keeps_the_request_id_read_before_the_bad_byte(edge):
    # nginx sends its X-Request-ID ahead of the client's headers: its log and the worker's answer must agree
    raw = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Request-ID: nginx-id.42\r\nUser-Agent: \x07\r\n\r\n"
    resp = exchange(edge.port, raw)
    assert resp.status == 400 and resp.headers["x-request-id"] == "nginx-id.42"
    assert resp.json()["error"]["request_id"] == "nginx-id.42"


def assert_error_body(resp) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["retryable"] is False, body
    return body["error"]
