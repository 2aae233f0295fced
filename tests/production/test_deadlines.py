"""Sync /generate under a deadline (`timeout_s`) and with clients that hang up: the job is dropped (queued) or
interrupted at its next step (running), the pipeline is freed, and the worker goes on serving."""
from __future__ import annotations

import json
import socket
import time

from tests.production.conftest import (LONG_JOB, QUICK_JOB, Worker, assert_error, job_state, submit_job, wait_job,
                                       wait_until)


def send_generate(worker: Worker, body: dict) -> socket.socket:
    """POST /generate on a raw socket, so the test decides when the client goes away."""
    raw = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", worker.port))
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(raw) + raw)
    return sock


def finished_metric(worker: Worker, status: str, code: str) -> float:
    for line in worker.client.get("/metrics").text.splitlines():
        if line.startswith("flux_jobs_finished_total{") and f'status="{status}"' in line and f'code="{code}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_running_request_past_its_timeout_is_504_and_the_pipeline_is_freed(idle_worker):
    w = idle_worker
    before = w.stats()
    started = time.monotonic()
    resp = w.client.post("/generate", json=dict(LONG_JOB, timeout_s=1.5))
    elapsed = time.monotonic() - started
    error = assert_error(resp, 504, "timeout")
    assert error["retryable"] is True
    assert 1.4 < elapsed < 5, f"answered after {elapsed:.1f} s for a 1.5 s deadline (the job alone takes ~15 s)"

    stats = w.stats()
    assert stats["running"] == 0 and stats["queued"] == 0, "the timed-out job still holds the pipeline"
    assert stats["images_generated"] == before["images_generated"]
    assert w.health().status_code == 200
    assert w.client.post("/generate", json=QUICK_JOB).status_code == 200


def test_queued_request_past_its_timeout_is_504_without_running(idle_worker):
    w = idle_worker
    blocker = submit_job(w, LONG_JOB)
    wait_job(w, blocker, lambda v: v["status"] == "running", 30, "the blocker to run")
    generated = w.stats()["images_generated"]

    started = time.monotonic()
    resp = w.client.post("/generate", json=dict(QUICK_JOB, timeout_s=0.5))
    elapsed = time.monotonic() - started
    assert_error(resp, 504, "timeout")
    assert elapsed < 3, f"a queued request with a 0.5 s deadline was answered after {elapsed:.1f} s"
    assert job_state(w, blocker)["status"] == "running", "the deadline of one request touched another"
    assert w.stats()["queued"] == 0

    w.client.delete(f"/jobs/{blocker}")
    assert w.stats()["images_generated"] == generated


def test_async_job_past_its_timeout_fails_with_a_timeout_error(idle_worker):
    w = idle_worker
    job_id = submit_job(w, dict(LONG_JOB, timeout_s=1))
    view = wait_job(w, job_id, lambda v: v["status"] not in ("queued", "running"), 10, "the job to end")
    assert view["status"] == "failed" and view["error"]["code"] == "timeout", view


def test_client_that_hangs_up_on_a_running_request_interrupts_it(idle_worker):
    w = idle_worker
    before = w.stats()
    cancelled_metric = finished_metric(w, "cancelled", "cancelled")
    sock = send_generate(w, LONG_JOB)
    wait_until(lambda: w.stats()["running"] == 1, 20, what="the request to start")
    time.sleep(0.3)  # a couple of denoising steps
    hung_up = time.monotonic()
    sock.close()

    wait_until(lambda: w.stats()["running"] == 0, 5, what="the abandoned request to stop running")
    assert time.monotonic() - hung_up < 3, "the job ran on after its client left"
    stats = w.stats()
    assert stats["cancelled"] == before["cancelled"] + 1
    assert stats["images_generated"] == before["images_generated"]
    assert finished_metric(w, "cancelled", "cancelled") == cancelled_metric + 1
    assert w.client.post("/generate", json=QUICK_JOB).status_code == 200


def test_client_that_hangs_up_while_queued_is_dropped_before_it_runs(idle_worker):
    w = idle_worker
    blocker = submit_job(w, LONG_JOB)
    wait_job(w, blocker, lambda v: v["status"] == "running", 30, "the blocker to run")
    before = w.stats()
    sock = send_generate(w, QUICK_JOB)
    wait_until(lambda: w.stats()["queued"] == 1, 10, what="the request to be queued")
    sock.close()

    wait_until(lambda: w.stats()["queued"] == 0, 5, what="the abandoned request to leave the queue")
    assert job_state(w, blocker)["status"] == "running"
    assert w.stats()["cancelled"] == before["cancelled"] + 1
    w.client.delete(f"/jobs/{blocker}")
    # were the dropped request still queued it would run now: count once the worker is idle again
    wait_until(lambda: (s := w.stats())["running"] == 0 and s["queued"] == 0, 10, what="the worker to be idle")
    time.sleep(0.3)
    assert w.stats()["images_generated"] == before["images_generated"], "the dropped request was rendered"


def test_request_id_comes_back_on_answers_and_errors(worker):
    ok = worker.client.post("/generate", json=QUICK_JOB, headers={"X-Request-ID": "trace-abc.123"})
    assert ok.status_code == 200
    assert ok.headers["x-request-id"] == "trace-abc.123" and ok.json()["request_id"] == "trace-abc.123"
    bad = worker.client.post("/generate", json={"prompt": ""}, headers={"X-Request-ID": "trace-def"})
    assert assert_error(bad, 422)["request_id"] == "trace-def"
    # an unusable id (spaces, too long) is replaced, never echoed
    odd = worker.client.post("/generate", json={"prompt": ""}, headers={"X-Request-ID": "x" * 100})
    assert odd.headers["x-request-id"] != "x" * 100
    assert "x" * 100 not in odd.text
