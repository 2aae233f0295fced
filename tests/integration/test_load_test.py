"""load_test.lua under a real wrk: images/s counts only 200 answers; the rest are listed by status."""
from __future__ import annotations

import http.server
import itertools
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")]


def test_503s_are_not_counted_as_images():
    counter, sent = itertools.count(), {200: 0, 503: 0}
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status = 200 if next(counter) % 3 == 0 else 503  # two of three are backpressure
            with lock:
                sent[status] += 1
            body = b'{"ok": true}' if status == 200 else b'{"error": {"code": "queue_full"}}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = subprocess.run(["wrk", "-t1", "-c2", "-d2s", "--timeout", "10s", "-s", str(ROOT / "load_test.lua"),
                              f"http://127.0.0.1:{port}/generate"], capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert out.returncode == 0, out.stderr
    images = re.search(r"images/s: ([0-9.]+) \(200 answers only: (\d+) in ([0-9.]+) s\)", out.stdout)
    assert images, out.stdout
    # wrk's own counts (a request answered after wrk stopped is in neither): every answer was 200 or 503
    total = int(re.search(r"(\d+) requests in", out.stdout).group(1))
    non_2xx = int(re.search(r"Non-2xx or 3xx responses: (\d+)", out.stdout).group(1))
    assert non_2xx > 0 and int(images.group(2)) == total - non_2xx <= sent[200]
    assert float(images.group(1)) == pytest.approx((total - non_2xx) / float(images.group(3)), rel=0.02, abs=0.01)
    assert re.search(rf"^  503: {non_2xx}$", out.stdout, re.M), out.stdout
