"""Real worker processes on free ports: `main_<precision>.py` (or a module such as the fault-injecting
tests/production/launcher.py) serving the real FluxPipeline with `dummy:tiny` weights on the CPU, each with its own
output folder and log file, talked to over HTTP."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
_VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
PYTHON = str(_VENV_PYTHON) if _VENV_PYTHON.exists() else sys.executable

# What every test worker shares: the tiny synthetic model on the CPU, warmed up at the size tests use.
BASE_ENV = {
    "FLUX_MODEL": "dummy:tiny",
    "FLUX_DEVICE": "cpu",
    "FLUX_WARMUP_SIZES": "256x256",
    "FLUX_WARMUP_STEPS": "1",
    "FLUX_LOG_LEVEL": "info",
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}


class Worker:
    """One worker process on a free port, with its own output folder and log file."""

    def __init__(self, name: str, workdir: Path, env: dict[str, str] | None = None, module: str | None = None,
                 precision: str = "bf16"):
        self.name = name
        self.precision = precision
        self.port = free_port()
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.output_dir = self.dir / "outputs"
        self.log_path = self.dir / "worker.log"
        self.env = dict(env or {})
        self.module = module
        self.proc: subprocess.Popen | None = None
        self.open_jobs: list[str] = []  # async jobs a test started: cancelled after it, pass or fail
        self.health_seen: list[str] = []  # each new /health status seen by poll_health, in order
        self._client: httpx.Client | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> "Worker":
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("FLUX_", "BF16_", "FP4_", "FP8_")) and not k.endswith("_API_PORT")}
        env.update(BASE_ENV)
        env.update({f"{self.precision.upper()}_API_PORT": str(self.port), "FLUX_OUTPUT_DIR": str(self.output_dir)})
        env.update(self.env)
        cmd = [PYTHON, "-m", self.module] if self.module else [PYTHON, f"main_{self.precision}.py"]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        return self

    def poll_health(self) -> bool:
        """One /health poll; records each new status in health_seen; True once ready. Raises if the process
        has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            response = httpx.get(f"{self.url}/health", timeout=2)
        except httpx.HTTPError:
            return False
        try:
            status = response.json().get("status")
        except ValueError:
            status = None
        if status and (not self.health_seen or self.health_seen[-1] != status):
            self.health_seen.append(status)
        return response.status_code == 200

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.2) -> "Worker":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.poll_health():
                return self
            time.sleep(interval)
        raise RuntimeError(f"worker {self.name} not ready after {timeout} s:\n{self.log_tail()}")

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(base_url=self.url, timeout=120)
        return self._client

    def stats(self) -> dict:
        return self.client.get("/queue-stats").json()

    def health(self) -> httpx.Response:
        return self.client.get("/health")

    def rss_bytes(self) -> int:
        return psutil.Process(self.pid).memory_info().rss

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_bytes(self) -> bytes:
        return self.log_path.read_bytes()

    def connect(self, timeout: float = 10.0) -> socket.socket:
        """A raw TCP connection to the worker, for requests no HTTP client would send (tests/harness/rawhttp.py)."""
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_all(*workers: Worker, timeout: float = 180.0, interval: float = 0.2) -> None:
    """Start several workers at once and wait until every one is ready (their imports overlap). Every worker is
    polled in turn from the start, so each one's "loading" phase is seen, not only the first's."""
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + timeout
    try:
        pending = list(workers)
        while pending:
            pending = [w for w in pending if not w.poll_health()]
            if pending and time.monotonic() > deadline:
                raise RuntimeError("not ready after %s s: %s\n%s" % (
                    timeout, ", ".join(w.name for w in pending), "\n".join(w.log_tail() for w in pending)))
            time.sleep(interval if pending else 0)
    except Exception:
        for worker in workers:
            worker.stop(5)
        raise


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def healthy(url: str) -> bool:
    """Whether GET {url}/health answers 200 (a worker that is ready, or nginx in front of one)."""
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
