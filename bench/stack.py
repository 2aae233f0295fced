"""Starting and stopping the service under test for the HTTP benchmark.

The start command is run by bash in its own session, from the repository root. Two shapes work:
- a launcher that returns once the service is up (`./start_multi_gpu.sh start ...`): its exit status
  is checked, and the stop command (by default the same script with `stop`) takes the service down;
- a server in the foreground (`python main_bf16.py`): it is stopped with SIGTERM to its process group,
  then SIGKILL if it has not drained in time.
Either way the service is ready when GET <url>/health answers 200.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import REPO_ROOT


class StackError(RuntimeError):
    """The service could not be started (or never became ready)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_stop_command(start_cmd: str) -> str | None:
    """`VAR=x ./start_multi_gpu.sh start -m bf16` → `VAR=x ./start_multi_gpu.sh stop` (same environment)."""
    match = re.search(r"^(.*?start_multi_gpu\.sh)\b", start_cmd)
    return f"{match.group(1)} stop" if match else None


def health_ok(url: str, timeout: float = 3.0) -> bool:
    try:
        with httpx.Client(trust_env=False, timeout=timeout) as client:
            return client.get(url.rstrip("/") + "/health").status_code == 200
    except httpx.HTTPError:
        return False


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


class Stack:
    def __init__(self, start_cmd: str, url: str, *, stop_cmd: str | None = None, env: dict | None = None,
                 log_path: str | os.PathLike | None = None, ready_timeout: float = 900.0,
                 grace_after_exit: float = 30.0, stop_timeout: float = 120.0):
        self.start_cmd = start_cmd
        self.url = url
        self.stop_cmd = stop_cmd if stop_cmd is not None else default_stop_command(start_cmd)
        self.env = {**os.environ, **(env or {})}
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="bench-stack-", suffix=".log")[1])
        self.ready_timeout = ready_timeout
        self.grace_after_exit = grace_after_exit
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen | None = None
        self.ready_s: float | None = None

    def __enter__(self) -> "Stack":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> float:
        if health_ok(self.url, timeout=1.0):
            raise StackError(f"{self.url} already answers /health before the start command ran: stop that "
                             "service first, or benchmark it without --start")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        print(f"[stack] starting: {self.start_cmd}  (log: {self.log_path})", file=sys.stderr, flush=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(["bash", "-c", self.start_cmd], cwd=REPO_ROOT, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = started + self.ready_timeout
        exited_at = None
        while True:
            if health_ok(self.url):
                self.ready_s = time.monotonic() - started
                print(f"[stack] ready after {self.ready_s:.1f} s", file=sys.stderr, flush=True)
                return self.ready_s
            code = self.proc.poll()
            now = time.monotonic()
            if code is not None and code != 0:
                self._fail(f"the start command exited with status {code}")
            if code == 0 and exited_at is None:
                exited_at = now  # a launcher finished: the service should answer very soon
            if exited_at is not None and now - exited_at > self.grace_after_exit:
                self._fail(f"the start command finished but {self.url}/health did not answer 200 within "
                           f"{self.grace_after_exit:.0f} s (is this the right URL? did nginx start?)")
            if now > deadline:
                self._fail(f"{self.url}/health not ready after {self.ready_timeout:.0f} s")
            time.sleep(0.5)

    def _fail(self, why: str):
        tail = log_tail(self.log_path)
        self.stop()
        raise StackError(f"{why}\n  last lines of {self.log_path}:\n{tail}")

    def stop(self) -> None:
        if self.stop_cmd:
            print(f"[stack] stopping: {self.stop_cmd}", file=sys.stderr, flush=True)
            with open(self.log_path, "ab") as log:
                try:
                    subprocess.run(["bash", "-c", self.stop_cmd], cwd=REPO_ROOT, env=self.env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    print(f"[stack] stop command still running after {self.stop_timeout:.0f} s", file=sys.stderr)
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        # A foreground server: SIGTERM drains it; the group takes its children along.
        self._signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            self._signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=10)

    @staticmethod
    def _signal_group(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # the group we created with start_new_session
        except ProcessLookupError:
            pass


def smoke_worker(output_dir: str, port: int | None = None) -> tuple[Stack, str]:
    """One CPU worker with dummy:tiny on a free port, for the CI smoke run; returns (stack, url)."""
    port = port or free_port()
    env = {
        "FLUX_MODEL": "dummy:tiny", "FLUX_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": "", "FLUX_HOST": "127.0.0.1",
        "FLUX_PORT": str(port), "BF16_API_PORT": str(port), "FLUX_OUTPUT_DIR": output_dir,
        "FLUX_WARMUP_SIZES": "256x256", "FLUX_WARMUP_STEPS": "1", "FLUX_LOG_LEVEL": "warning",
        "FLUX_MAX_CONCURRENT": "2", "PYTHONUNBUFFERED": "1",
    }
    url = f"http://127.0.0.1:{port}"
    cmd = f"exec {shlex.quote(sys.executable)} main_bf16.py"
    return Stack(cmd, url, stop_cmd="", env=env, log_path=Path(output_dir) / "worker.log", ready_timeout=120,
                 stop_timeout=30), url
