"""The rendered nginx's media types and page headers, with a real nginx: an answer nginx makes itself is JSON
whatever the URL ends with (/jobs/x.html is no HTML page, /images/x.svg no SVG), the files it serves keep their
types, and the pages carry a strict Content-Security-Policy and the headers that keep them out of frames."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from scripts.render_nginx import Options, Worker
from tests.integration.nginx_proc import EchoUpstream, Nginx, raw_request, split_response, world_readable_tmp
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")]
IMAGE = "live-" + "ab" * 16 + ".png"


@pytest.fixture()
def gateway(tmp_path):
    live, remote, port = free_port(), free_port(), free_port()
    images = world_readable_tmp(tmp_path)
    (images / IMAGE).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    os.chmod(images / IMAGE, 0o644)
    workers = [Worker("127.0.0.1", live, "fp4", "live"), Worker("127.0.0.2", remote, "bf16", "remote")]
    opts = Options(listen=f"127.0.0.1:{port}", web_dir=str(ROOT / "web"), images_dir=str(images))
    try:
        with EchoUpstream("127.0.0.1", live, "live"), Nginx(tmp_path, workers, opts) as nginx:
            yield nginx
    finally:
        shutil.rmtree(images, ignore_errors=True)


def _get(port: int, path: str) -> tuple[int, dict, bytes]:
    return split_response(raw_request(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()))


@pytest.mark.parametrize("path", [
    "/jobs/x.html", "/jobs/x.svg", "/jobs/x/events.html", "/jobs/nobody-1.js",
    "/images/x.html", "/images/a.svg", "/images/live-" + "AB" * 16 + ".png",
    "/workers/x.html", "/workers/nobody/health.css", "/workers/nobody/metrics.html",
    "/ui/missing.html", "/dashboard/missing.svg",
])
def test_answers_nginx_makes_itself_are_json_whatever_the_url_ends_with(gateway, path):
    status, headers, body = _get(gateway.port, path)
    assert status in (403, 404), (path, status, body[:200])
    assert headers["content-type"] == "application/json", (path, headers)
    assert json.loads(body)["error"]["code"]


@pytest.mark.parametrize(("path", "media_type"), [
    ("/ui/", "text/html"), ("/ui/index.html", "text/html"), ("/ui/playground.js", "application/javascript"),
    ("/ui/theme.css", "text/css"), ("/ui/favicon.svg", "image/svg+xml"), ("/dashboard/", "text/html"),
    ("/dashboard/dashboard.js", "application/javascript"), ("/dashboard/workers.json", "application/json"),
    (f"/images/{IMAGE}", "image/png"),
])
def test_files_keep_their_media_types(gateway, path, media_type):
    status, headers, _ = _get(gateway.port, path)
    assert status == 200, (path, status)
    assert headers["content-type"] == media_type, (path, headers)


@pytest.mark.parametrize("path", ["/ui/", "/dashboard/", "/ui/playground.js", "/dashboard/dashboard.css"])
def test_pages_carry_a_strict_policy_and_stay_out_of_frames(gateway, path):
    status, headers, _ = _get(gateway.port, path)
    assert status == 200
    policy = {d.strip().split(" ", 1)[0]: d.strip() for d in headers["content-security-policy"].split(";")}
    assert policy["default-src"] == "default-src 'self'"
    for directive in ("object-src", "base-uri", "form-action", "frame-ancestors"):
        assert policy.get(directive) == f"{directive} 'none'", (directive, policy)
    assert "script-src" not in policy and "unsafe" not in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["x-content-type-options"] == "nosniff"
