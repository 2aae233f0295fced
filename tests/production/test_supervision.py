"""A scheduler that dies (tests/production/launcher.py plants an exception that escapes the scheduler task):
every request waiting or queued is answered with the retryable 503 worker_failed right away (not at its
deadline) and the process exits 3 for its supervisor to restart. /health's "failed" in that short window is
tested in process (tests/unit/test_service.py)."""
from __future__ import annotations

import concurrent.futures
import time

import pytest

from tests.production.conftest import QUICK_JOB, Worker, assert_error, start_all

LAUNCHER = "tests.production.launcher"
CRASH = {"prompt": "[scheduler-crash] a render", "width": 1024, "height": 1024, "num_inference_steps": 100}


@pytest.mark.timeout(240)
def test_a_dead_scheduler_fails_pending_work_at_once_and_the_worker_exits(workdir):
    # a long deadline: an answer only at the deadline would be 10 minutes away
    w = Worker("scheduler-crash", workdir, {"FLUX_MAX_CONCURRENT": "1", "FLUX_REQUEST_TIMEOUT_S": "600",
                                           "FLUX_WORKER_ID": "crashing"},
               module=LAUNCHER)
    start_all(w)
    try:
        crashing = w.client.post("/jobs", json=CRASH).json()["job_id"]
        queued = w.client.post("/jobs", json=QUICK_JOB).json()["job_id"]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            waiting = pool.submit(w.client.post, "/generate", json=dict(QUICK_JOB, seed=5))
            resp = waiting.result(60)
            elapsed = time.monotonic() - started
        error = assert_error(resp, 503, "worker_failed")
        assert error["retryable"] is True and resp.headers.get("retry-after")
        assert elapsed < 30, f"answered after {elapsed:.1f} s"
        try:
            w.proc.wait(20)
        except Exception:
            pytest.fail("a worker whose scheduler died kept running")
        assert w.proc.returncode == 3, f"exit code {w.proc.returncode}: supervision restarts on non-zero"
        assert "queue scheduler died" in w.log_text()
    finally:
        w.stop(5)
    # what the jobs were answered is in the worker's job store: the restarted worker reads it back
    again = Worker("scheduler-crash", workdir, {"FLUX_WORKER_ID": w.env["FLUX_WORKER_ID"]})
    start_all(again)
    try:
        for job_id in (crashing, queued):
            view = again.client.get(f"/jobs/{job_id}").json()
            assert view["status"] == "failed" and view["error"]["code"] == "worker_failed", view
            assert view["error"]["retryable"] is True
    finally:
        again.stop()
