"""A real nginx for the tests: render a config with scripts/render_nginx.py, run it in the foreground, stop it.

Not a fixture file: the tests that need nginx import `Nginx` and `raw_request` from here.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from scripts.render_nginx import Options, Worker, find_headers_more, render

ROOT = Path(__file__).resolve().parents[2]
NGINX = shutil.which("nginx")


class Nginx:
    """nginx -p TMP/ -c TMP/nginx.conf, daemon off, stopped with SIGQUIT (then SIGKILL)."""

    def __init__(self, tmp: Path, workers: list[Worker], opts: Options):
        self.tmp, self.opts = tmp, opts
        self.port = int(opts.listen.rsplit(":", 1)[-1])
        self.url = f"http://127.0.0.1:{self.port}"
        if opts.headers_more is None:
            opts.headers_more = find_headers_more()
        self.conf = tmp / "nginx.conf"
        self.conf.write_text(render(workers, opts))
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Nginx":
        self.err = open(self.tmp / "error.log", "wb")
        self.access = open(self.tmp / "access.log", "wb")
        self.proc = subprocess.Popen([NGINX, "-p", f"{self.tmp}/", "-c", str(self.conf), "-g",
                                      f"daemon off; pid {self.tmp}/nginx.pid;"],
                                     stdout=self.access, stderr=self.err, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(f"nginx did not listen: {(self.tmp / 'error.log').read_text()[-2000:]}")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()
        self.access.close()

    def access_log(self) -> str:
        return (self.tmp / "access.log").read_text()


def raw_request(port: int, data: bytes, timeout: float = 10.0, source: str | None = None) -> bytes:
    """Sends bytes as they are and returns everything nginx answers before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                  source_address=(source, 0) if source else None) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return status, headers, body


def world_readable_tmp(tmp: Path) -> Path:
    """A folder nginx's unprivileged workers can reach (pytest's own tmp is 0700 for root)."""
    import tempfile
    path = Path(tempfile.mkdtemp(prefix="flux-nginx-", dir="/tmp"))
    os.chmod(path, 0o755)
    return path


class EchoUpstream:
    """A stand-in for a worker where only nginx's routing is under test: answers JSON naming itself and what it
    received (path, X-Request-ID). `hang=True` accepts and never answers (for 504)."""

    def __init__(self, host: str, port: int, name: str, hang: bool = False):
        import http.server
        import json
        import threading

        outer = self
        self.seen: list[dict] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                if hang:
                    time.sleep(30)
                    return
                info = {"server": name, "path": self.path, "method": self.command,
                        "request_id": self.headers.get("X-Request-ID")}
                outer.seen.append(info)
                body = json.dumps(info).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Request-ID", "upstream-own-id")
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args):
                pass

        http.server.ThreadingHTTPServer.daemon_threads = True
        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "EchoUpstream":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
