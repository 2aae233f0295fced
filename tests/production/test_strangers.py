"""A stranger against a real worker behind the real rendered nginx: answers nginx makes itself (conditional and
range requests on an image, an HTTP version it does not speak, JSON it answers on a URI with a file extension),
headers a client invents (X-Forwarded-Host, a Host for a redirect), bodies compressed
(gzip), and what reaches the operator's logs (nginx's error log through start_multi_gpu.sh, its access log).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from scripts.render_nginx import Options, Worker as Upstream
from tests.harness.asserts import assert_png
from tests.harness.process import PYTHON, ROOT, Worker, start_all
from tests.harness.rawhttp import exchange, post_json_request
from tests.harness.waiting import wait_until
from tests.integration.nginx_proc import Nginx, world_readable_tmp
from tests.ports import free_port

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
QUICK = json.dumps({"prompt": "a stranger", "width": 256, "height": 256, "num_inference_steps": 1}).encode()
ERROR_KEYS = {"code", "message", "field", "retryable", "type", "param", "request_id"}


@pytest.fixture(scope="module")
def stack(workdir, tmp_path_factory):
    """One bf16 worker (trusting 127.0.0.1, the default: nginx is its proxy) behind the rendered nginx, which
    serves the worker's images from the shared folder."""
    outputs = world_readable_tmp(workdir)
    worker = Worker("strangers", workdir, {"FLUX_OUTPUT_DIR": str(outputs)})
    worker.output_dir = outputs
    start_all(worker)
    tmp = tmp_path_factory.mktemp("strangers-nginx")
    opts = Options(listen=f"127.0.0.1:{free_port()}", images_dir=str(outputs), web_dir=str(ROOT / "web"))
    try:
        with Nginx(tmp, [Upstream("127.0.0.1", worker.port, "bf16")], opts) as nginx:
            nginx.worker = worker
            yield nginx
    finally:
        worker.stop()
        shutil.rmtree(outputs, ignore_errors=True)


def request(port: int, head: str, body: bytes = b""):
    resp = exchange(port, head.encode("latin-1") + b"\r\n\r\n" + body)
    assert resp is not None, head
    return resp


def generate(port: int, headers: dict[str, str] | None = None) -> dict:
    resp = exchange(port, post_json_request("/generate", QUICK, {"Host": "x", **(headers or {}), "Connection": "close"}))
    assert resp is not None and resp.status == 200, resp
    return resp.json()


def assert_anonymous_json_error(resp, status: int, code: str) -> dict:
    assert resp.status == status, resp
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    assert "server" not in resp.headers, resp.headers
    assert b"nginx" not in resp.body.lower() and "nginx" not in json.dumps(resp.headers).lower()
    error = resp.json()["error"]
    assert ERROR_KEYS <= set(error) and error["code"] == code, error
    return error


# ---- errors nginx makes itself ----------------------------------------------------------------------------
def test_conditional_and_range_errors_on_an_image_are_api_json(stack):
    name = generate(stack.port)["image_url"].rsplit("/", 1)[1]
    path = f"/images/{name}"
    ok = request(stack.port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close")
    assert ok.status == 200 and ok.headers["content-type"] == "image/png"
    assert_png(ok.body)
    cases = [
        ('If-Match: "not-this-one"', 412, "precondition_failed"),
        ("If-Unmodified-Since: Mon, 01 Jan 1990 00:00:00 GMT", 412, "precondition_failed"),
    ]
    for header, status, code in cases:
        resp = request(stack.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n{header}\r\nConnection: close")
        assert_anonymous_json_error(resp, status, code)
        # an error is no image: one request id, and nothing a shared cache could keep for a day and hand to
        # everyone asking for the image afterwards
        assert len(resp.all("x-request-id")) == 1, (header, resp.header_lines)
        assert "immutable" not in resp.headers.get("cache-control", "") and \
            "max-age=86400" not in resp.headers.get("cache-control", ""), (header, resp.header_lines)
    # whole files only: a Range, satisfiable or not, is answered with the image (no 416 an image's cache headers
    # could stick to)
    for wanted in ("bytes=0-3", "bytes=99999999-"):
        whole = request(stack.port, f"GET {path} HTTP/1.1\r\nHost: x\r\nRange: {wanted}\r\nConnection: close")
        assert whole.status == 200 and whole.body == ok.body and "content-range" not in whole.headers, wanted


def test_an_http_version_nginx_does_not_speak_is_api_json(stack):
    resp = request(stack.port, "GET /health HTTP/2.0\r\nHost: x\r\nConnection: close")
    assert_anonymous_json_error(resp, 505, "http_version_not_supported")


@pytest.mark.parametrize("path", ["/images/notes.png", "/images/" + "a" * 300 + ".png", "/jobs/nobody.html",
                                  "/jobs/nobody/events.js", "/workers/nobody/health", "/workers/x.png"])
def test_json_nginx_answers_itself_is_labelled_json_whatever_the_extension(stack, path):
    resp = request(stack.port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close")
    assert resp.status == 404, resp
    assert resp.headers["content-type"] == "application/json", (path, resp.headers)
    assert resp.json()["error"]["code"] in ("not_found", "job_not_found", "worker_not_found")


# ---- headers a client invents ------------------------------------------------------------------------------
def test_a_clients_x_forwarded_host_does_not_steer_image_url_through_nginx(stack):
    # the worker trusts nginx (127.0.0.1); nginx must not pass a client's X-Forwarded-Host on as its own word
    url = generate(stack.port, {"Host": "api.example.com", "X-Forwarded-Host": "evil.example",
                                "X-Forwarded-Proto": "javascript"})["image_url"]
    assert re.fullmatch(r"http://api\.example\.com/images/\w+-[0-9a-f]{32}\.png", url), url
    # the worker itself still honours its trusted proxy's header
    direct = generate(stack.worker.port, {"Host": "w", "X-Forwarded-Host": "cdn.example.com"})["image_url"]
    assert direct.startswith("http://cdn.example.com/images/"), direct


@pytest.mark.parametrize("path", ["/generate/", "/health/", "/jobs/x/", "/v1/images/generations/"])
def test_a_trailing_slash_is_no_redirect_to_the_clients_host(stack, path):
    for port in (stack.port, stack.worker.port):
        method = "GET" if path == "/health/" else "POST"
        resp = request(port, f"{method} {path} HTTP/1.1\r\nHost: evil.example\r\nContent-Length: 0\r\n"
                             "Connection: close")
        assert "location" not in resp.headers, (port, path, resp.headers)
        assert resp.status == 404 and resp.json()["error"]["code"] in ("not_found", "job_not_found"), resp


# ---- bodies -------------------------------------------------------------------------------------------------
def test_a_compressed_body_is_refused_by_name(stack):
    import gzip
    body = gzip.compress(QUICK)
    resp = exchange(stack.port, post_json_request("/generate", body, {"Host": "x", "Content-Encoding": "gzip",
                                                                       "Connection": "close"}))
    assert resp.status == 415, resp
    assert resp.json()["error"]["field"] == "content-encoding", resp.json()


# ---- what reaches the operator's screen --------------------------------------------------------------------
C1_AND_FRIENDS = ["\u009b31mred", "line\u2028sep", "bidi\u202eevil", "nel\u0085x"]


def test_the_access_log_keeps_c1_controls_and_bidi_overrides_out(stack):
    before = len((stack.tmp / "access.log").read_bytes().splitlines())
    for text in C1_AND_FRIENDS:
        head = f"GET /health HTTP/1.1\r\nHost: x\r\nUser-Agent: ua {text}\r\nConnection: close"
        request(stack.port, head.encode("utf-8").decode("latin-1"))
    request(stack.port, "GET /health HTTP/1.1\r\nHost: x\r\nUser-Agent: caf\u00e9\r\nConnection: close"
            .encode("utf-8").decode("latin-1"))
    def ours():
        lines = (stack.tmp / "access.log").read_bytes().splitlines()[before:]
        return [line for line in lines if json.loads(line)["uri"] == "/health"]
    wait_until(lambda: len(ours()) >= len(C1_AND_FRIENDS) + 1, 5, 0.1, "an access line per request")
    lines = ours()
    records = [json.loads(line) for line in lines]
    assert len(records) == len(C1_AND_FRIENDS) + 1, records
    for line in lines:
        assert not re.search(rb"\xc2[\x80-\x9f]|\xe2\x80[\xa8-\xae]|\xe2\x81[\xa6-\xa9]", line), line
    assert records[-1]["user_agent"] == "caf\u00e9"  # printable UTF-8 is kept


def test_nginx_error_log_escapes_what_a_client_sends(stack, tmp_path):
    """nginx copies the Referer and the request line into its error log byte for byte (a 413, a rate-limit
    rejection, a missing file): start_multi_gpu.sh's nginx entry point (the systemd unit) writes it escaped."""
    port = free_port()
    logs = tmp_path / "logs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_") and k != "VIRTUAL_ENV"}
    env.update({"NUM_GPUS": "1", "BASE_PORT": str(stack.worker.port), "NGINX_PORT": str(port),
                "NGINX_ADDR": "127.0.0.1", "FLUX_MODE": "bf16", "FLUX_DEVICE": "cpu", "FLUX_PYTHON": PYTHON,
                "FLUX_RUN_DIR": str(tmp_path / "run"), "FLUX_LOG_DIR": str(logs), "NGINX_LOG_DIR": str(logs),
                "FLUX_OUTPUT_DIR": str(stack.worker.output_dir), "NGINX_MAX_BODY": "1k", "NO_COLOR": "1"})
    unit = subprocess.Popen([str(ROOT / "start_multi_gpu.sh"), "nginx"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: _answers(port), 20, 0.2, "nginx of start_multi_gpu.sh nginx")
        hostile = "http://x/\x1b[2J\x1b[31mforged\u009b1m\x7fERROR"
        resp = request(port, "POST /generate HTTP/1.1\r\nHost: x\r\nReferer: "
                       + hostile.encode("utf-8").decode("latin-1") + "\r\nContent-Length: 5000\r\nConnection: close")
        assert resp.status == 413
        request(port, "GET /images/" + "0" * 32 + ".png HTTP/1.1\r\nHost: x\r\nReferer: \x1b]0;title\x07\r\n"
                "Connection: close")
        error_log = logs / "error.log"
        wait_until(lambda: b"too large body" in error_log.read_bytes(), 10, 0.1, "the 413 in the error log")
        raw = error_log.read_bytes()
        assert not re.search(rb"[\x00-\x09\x0b-\x1f\x7f]|\xc2[\x80-\x9f]", raw), raw[-600:]
        assert b'referrer: "http://x/\\x1b[2J\\x1b[31mforged\\x9b1m\\x7fERROR"' in raw, raw[-600:]
    finally:
        unit.send_signal(signal.SIGQUIT)  # what systemd sends the unit's main process (KillMode=mixed)
        unit.wait(15)
    # the escaping filter ends with nginx: nothing is left holding the log
    wait_until(lambda: not _filters_for(logs), 10, 0.1, "the error-log filter to exit")


def _answers(port: int) -> bool:
    try:
        return exchange(port, b"GET /nginx-health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 2) is not None
    except OSError:
        return False


def _filters_for(logs: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if b"escape_log.py" in (proc / "cmdline").read_bytes() and \
                    any(str(logs) in os.readlink(fd) for fd in (proc / "fd").iterdir()):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


# ---- a worker reached directly ----------------------------------------------------------------------------
def _rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024


def test_a_worker_reached_directly_refuses_a_huge_header_before_buffering_it(stack):
    import socket
    worker = stack.worker
    before = _rss_mb(worker.pid)
    answers = []
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", worker.port), timeout=30) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Request-ID: big-header-1\r\n")
            try:
                for i in range(64):  # 64 MiB of header, unless the worker stops reading first
                    sock.sendall(b"X-Big-%d: %s\r\n" % (i, b"a" * (1 << 20)))
                sock.sendall(b"\r\n")
            except OSError:
                pass  # closed on us mid-send: what a bound looks like
            raw = b""
            try:
                while chunk := sock.recv(65536):
                    raw += chunk
            except OSError:
                pass
            answers.append(raw)
    assert _rss_mb(worker.pid) - before < 64, (before, _rss_mb(worker.pid))
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 431")]
    assert refused, [a[:200] for a in answers]
    head, _, body = refused[0].partition(b"\r\n\r\n")
    error = json.loads(body)["error"]
    assert error["code"] == "header_too_large" and error["request_id"] == "big-header-1", error
    # a header of ordinary size (nginx's own bound is 4 x 8 KiB) is served as before
    ok = request(worker.port, "GET /health HTTP/1.1\r\nHost: x\r\nX-Fill: " + "f" * 30000 + "\r\nConnection: close")
    assert ok.status == 200, ok


def test_a_request_line_the_worker_refuses_keeps_nginxs_request_id(stack):
    """nginx passes on a path byte httptools refuses; the worker's 400 must carry the id nginx logged and sent,
    found in the header block the parser never reached."""
    for sent, kept in (("line-id-1", True), ("bad id!", False)):
        raw = (b"GET /health/\xc2\x9b31m HTTP/1.1\r\nHost: x\r\nX-Request-ID: " + sent.encode()
               + b"\r\nConnection: close\r\n\r\n")
        resp = exchange(stack.port, raw)
        assert resp.status == 400, resp
        body_id = resp.json()["error"]["request_id"]
        assert resp.headers["x-request-id"] == body_id, (resp.headers, resp.body)
        assert (body_id == sent) is kept, body_id
        wait_until(lambda: f'"request_id":"{body_id}"' in stack.access_log(), 5, 0.1, "nginx's access line")
        wait_until(lambda: f"request_id={body_id} " in stack.worker.log_text(), 5, 0.1, "the worker's log line")
