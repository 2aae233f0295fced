"""Real worker processes for the production tests.

Every worker here is a real `main_bf16.py` (or the fault-injecting launcher next to this file) serving the
real FluxPipeline with `dummy:tiny` weights on the CPU, on a free port, talked to over HTTP. Workers are
started once per session or module and shared; tests that consume a worker (SIGTERM, fatal errors) start
their own. Starting several at once (`start_all`) overlaps their imports.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import httpx
import psutil
import pytest

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
    "PYTHONUNBUFFERED": "1",
}

# A response that shows any of these leaks internals: a traceback, a source file, a file-system path.
LEAK_RE = re.compile(r"Traceback|File \"|site-packages|\w\.py\b|/work/|/home/|/tmp/|/usr/|/var/|\bline \d+, in\b")

# A job that would run for about 15 s at 1024x1024 on the CPU (~0.15 s a step): long enough to
# watch it run and to cancel it, and cheap when cancelled after a few steps.
LONG_JOB = {"prompt": "a long render", "width": 1024, "height": 1024, "num_inference_steps": 100, "seed": 1}
QUICK_JOB = {"prompt": "a quick render", "width": 256, "height": 256, "num_inference_steps": 1}


def pytest_collection_modifyitems(config, items):
    # no test may hang the suite: a default per-test limit unless the test sets its own
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(180))


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll until predicate() is truthy; returns its value, or fails the test naming what never happened."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Worker:
    """One worker process on a free port, with its own output folder and log file."""

    def __init__(self, name: str, workdir: Path, env: dict[str, str] | None = None, module: str | None = None):
        self.name = name
        self.port = free_port()
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.output_dir = self.dir / "outputs"
        self.log_path = self.dir / "worker.log"
        self.env = dict(env or {})
        self.module = module
        self.proc: subprocess.Popen | None = None
        self.open_jobs: list[str] = []  # async jobs a test started: cancelled after it, pass or fail
        self._client: httpx.Client | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> "Worker":
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_") and not k.endswith("_API_PORT")}
        env.update(BASE_ENV)
        env.update({"BF16_API_PORT": str(self.port), "FLUX_OUTPUT_DIR": str(self.output_dir)})
        env.update(self.env)
        cmd = [PYTHON, "-m", self.module] if self.module else [PYTHON, "main_bf16.py"]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        return self

    def wait_ready(self, timeout: float = 120.0) -> "Worker":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
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


def start_all(*workers: Worker, timeout: float = 180.0) -> None:
    """Start several workers at once and wait until every one is ready (their imports overlap)."""
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.wait_ready(timeout)
    except Exception:
        for worker in workers:
            worker.stop(5)
        raise


# ---- response checks -------------------------------------------------------------------------------
def assert_no_leak(text: str) -> None:
    match = LEAK_RE.search(text)
    assert match is None, f"response leaks internals ({match.group(0)!r}): {text[:800]}"


def assert_error(resp: httpx.Response, status: int | tuple[int, ...], code: str | None = None) -> dict:
    """A JSON error body {"error": {"code", "message", ...}} with the expected status, leaking nothing."""
    statuses = (status,) if isinstance(status, int) else status
    assert resp.status_code in statuses, f"expected {statuses}, got {resp.status_code}: {resp.text[:500]}"
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    body = resp.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    error = body["error"]
    assert isinstance(error.get("code"), str) and error["code"], error
    assert isinstance(error.get("message"), str) and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    assert_no_leak(resp.text)
    return error


def assert_png(data: bytes, width: int | None = None, height: int | None = None) -> None:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    if width is not None:
        import io

        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            assert img.size == (width, height)


def image_files(folder: Path) -> list[str]:
    """Every entry in an output folder, temp files included (a partial write would show here)."""
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def sse_events(lines) -> list[tuple[str, dict]]:
    """Parse text/event-stream lines into (event, data) pairs."""
    events, name, data = [], None, []
    for line in lines:
        if line == "":
            if name is not None or data:
                events.append((name or "message", json.loads("\n".join(data)) if data else {}))
            name, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    return events


# ---- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("production")


@pytest.fixture(scope="session")
def worker(workdir):
    """The shared, well-behaved worker: default queue, GPU index 1 in its labels."""
    w = Worker("main", workdir, {"FLUX_GPU_INDEX": "1"})
    start_all(w)
    yield w
    w.stop()


@pytest.fixture
def idle_worker(worker):
    """The shared worker, with nothing queued or running before and after the test."""
    def quiet():
        s = worker.stats()
        return s["queued"] == 0 and s["running"] == 0

    wait_until(quiet, 60, 0.1, "the shared worker to be idle")
    yield worker
    # cancel whatever a failed test left behind, so the next test starts clean
    while worker.open_jobs:
        worker.client.delete(f"/jobs/{worker.open_jobs.pop()}")
    wait_until(quiet, 60, 0.1, "the shared worker to be idle after the test")


def submit_job(worker: Worker, body: dict, **kwargs) -> str:
    """POST /jobs, remember the id for clean-up; returns the job id."""
    resp = worker.client.post("/jobs", json=body, **kwargs)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    worker.open_jobs.append(job_id)
    return job_id


def job_state(worker: Worker, job_id: str) -> dict:
    resp = worker.client.get(f"/jobs/{job_id}")
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_job(worker: Worker, job_id: str, predicate, timeout: float = 60, what: str = "job state"):
    holder = {}

    def check():
        holder["view"] = job_state(worker, job_id)
        return predicate(holder["view"])

    wait_until(check, timeout, 0.05, what)
    return holder["view"]
