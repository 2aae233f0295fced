"""Fault injection on a real worker process (tests/production/launcher.py): out-of-memory, repeated GPU
failures, a sticky CUDA error, a full disk, an unwritable output folder, a full queue, the server's default
deadline. Each fault must give a clear JSON error, leak nothing, and leave the worker serving."""
from __future__ import annotations

import shutil
import time

import pytest

from tests.production.conftest import (LONG_JOB, QUICK_JOB, Worker, assert_error, image_files, start_all,
                                       submit_job, wait_job, wait_until)

LAUNCHER = "tests.production.launcher"
DEFAULT_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def faulty(workdir):
    fault_dir = workdir / "faulty-switches"
    fault_dir.mkdir(exist_ok=True)
    w = Worker("faulty", workdir, {"FLUX_TEST_FAULT_DIR": str(fault_dir), "FLUX_MAX_QUEUE_SIZE": "2",
                                   "FLUX_REQUEST_TIMEOUT_S": str(DEFAULT_TIMEOUT_S),
                                   "FLUX_MAX_CONSECUTIVE_FAILURES": "3"}, module=LAUNCHER)
    w.fault_dir = fault_dir
    start_all(w)
    yield w
    w.stop()


@pytest.fixture
def worker_ok(faulty):
    """The faulty worker, healthy and idle before the test, and made healthy again after it."""
    assert faulty.running(), faulty.log_tail()
    wait_until(lambda: faulty.stats()["running"] == 0 and faulty.stats()["queued"] == 0, 30, what="an idle worker")
    if faulty.stats()["consecutive_failures"]:  # one success ends a run of failures left by a previous test
        assert faulty.client.post("/generate", json=QUICK_JOB).status_code == 200
    yield faulty
    (faulty.fault_dir / "disk_full").unlink(missing_ok=True)
    while faulty.open_jobs:
        faulty.client.delete(f"/jobs/{faulty.open_jobs.pop()}")
    if faulty.health().status_code != 200:  # one success ends a run of failures
        faulty.client.post("/generate", json=QUICK_JOB)
    assert faulty.health().status_code == 200


def test_out_of_memory_is_a_retryable_503_and_the_worker_keeps_serving(worker_ok):
    w = worker_ok
    before = w.stats()
    resp = w.client.post("/generate", json=dict(QUICK_JOB, prompt="[oom] a cat"))
    error = assert_error(resp, 503, "out_of_memory")
    assert error["retryable"] is True and int(resp.headers["retry-after"]) >= 1
    assert "20.00 GiB" not in resp.text, "the device's message is for the log, not the client"

    assert w.health().status_code == 200, "one OOM must not take the worker out of rotation"
    ok = w.client.post("/generate", json=QUICK_JOB)
    assert ok.status_code == 200, ok.text
    stats = w.stats()
    assert stats["failed"] == before["failed"] + 1 and stats["consecutive_failures"] == 0

    job_id = submit_job(w, dict(QUICK_JOB, prompt="[oom] async"))
    view = wait_job(w, job_id, lambda v: v["status"] == "failed", 10, "the job to fail")
    assert view["error"]["code"] == "out_of_memory" and view["error"]["retryable"] is True


@pytest.mark.parametrize("marker,status,code", [("[fail]", 500, "generation_failed"),
                                                ("[oom]", 503, "out_of_memory")])
def test_repeated_failures_flip_health_to_degraded_until_a_success(worker_ok, marker, status, code):
    w = worker_ok
    for i in range(3):
        resp = w.client.post("/generate", json=dict(QUICK_JOB, prompt=f"{marker} attempt {i}"))
        assert_error(resp, status, code)
        assert "secret" not in resp.text and "kernel" not in resp.text
        if i < 2:
            assert w.health().status_code == 200, f"/health turned 503 after {i + 1} failure(s)"
    health = w.health()
    assert health.status_code == 503 and health.json()["status"] == "degraded", health.text
    metrics = w.client.get("/metrics").text
    assert 'flux_ready{gpu="cpu",precision="bf16"} 0.0' in metrics

    # still answering what reaches it (the balancer decides), and one success restores readiness
    ok = w.client.post("/generate", json=QUICK_JOB)
    assert ok.status_code == 200, ok.text
    assert w.health().status_code == 200 and w.health().json()["status"] == "ready"


def test_failure_details_go_to_the_log_not_the_client(worker_ok):
    w = worker_ok
    resp = w.client.post("/generate", json=dict(QUICK_JOB, prompt="[fail] logged"))
    error = assert_error(resp, 500, "generation_failed")
    wait_until(lambda: "/opt/flux/secret/models/kernel.py" in w.log_text(), 5, what="the trace in the worker log")
    wait_until(lambda: f"request_id={error['request_id']}" in w.log_text(), 5,
               what="an access-log line with the request id the client got")


def test_full_disk_is_507_with_no_partial_file_and_the_worker_stays_up(worker_ok):
    w = worker_ok
    before = image_files(w.output_dir)
    (w.fault_dir / "disk_full").touch()
    resp = w.client.post("/generate", json=QUICK_JOB)
    error = assert_error(resp, 507, "storage_full")
    assert error["retryable"] is True
    job_id = submit_job(w, QUICK_JOB)
    view = wait_job(w, job_id, lambda v: v["status"] == "failed", 10, "the job to fail")
    assert view["error"]["code"] == "storage_full"
    assert image_files(w.output_dir) == before, "a failed write left a file behind"
    assert w.health().status_code == 200

    (w.fault_dir / "disk_full").unlink()
    ok = w.client.post("/generate", json=QUICK_JOB)
    assert ok.status_code == 200, ok.text
    assert len(image_files(w.output_dir)) == len(before) + 1


def test_unwritable_output_folder_is_503_with_no_partial_file(worker_ok):
    w = worker_ok
    moved = w.output_dir.with_name("outputs.moved")
    shutil.move(w.output_dir, moved)
    w.output_dir.write_text("not a folder")  # every write below it fails, even for root
    try:
        resp = w.client.post("/generate", json=QUICK_JOB)
        assert_error(resp, 503, "storage_error")
        assert w.health().status_code == 200 and w.running()
    finally:
        w.output_dir.unlink()
        shutil.move(moved, w.output_dir)
    assert not [n for n in image_files(w.output_dir) if n.startswith(".tmp")]
    assert w.client.post("/generate", json=QUICK_JOB).status_code == 200


def test_full_queue_is_503_with_retry_after(worker_ok):
    w = worker_ok
    blocker = submit_job(w, LONG_JOB)
    wait_job(w, blocker, lambda v: v["status"] == "running", 30, "the blocker to run")
    submit_job(w, dict(QUICK_JOB, num_inference_steps=2))
    submit_job(w, dict(QUICK_JOB, num_inference_steps=3))
    resp = w.client.post("/generate", json=QUICK_JOB)
    error = assert_error(resp, 503, "queue_full")
    assert error["retryable"] is True and int(resp.headers["retry-after"]) >= 1
    assert_error(w.client.post("/jobs", json=QUICK_JOB), 503, "queue_full")
    metrics = w.client.get("/metrics").text
    assert 'flux_requests_rejected_total{gpu="cpu",precision="bf16",reason="queue_full"} 2.0' in metrics


def test_server_default_deadline_applies_without_a_timeout_field(worker_ok):
    w = worker_ok
    started = time.monotonic()
    resp = w.client.post("/generate", json=LONG_JOB)
    elapsed = time.monotonic() - started
    assert_error(resp, 504, "timeout")
    assert DEFAULT_TIMEOUT_S - 0.1 < elapsed < DEFAULT_TIMEOUT_S + 3, elapsed
    assert w.stats()["running"] == 0


def test_sticky_cuda_error_fails_the_request_and_the_worker_exits_for_a_restart(workdir):
    w = Worker("cuda-error", workdir, module=LAUNCHER)
    start_all(w)
    try:
        resp = w.client.post("/generate", json=dict(QUICK_JOB, prompt="[cuda-error] a cat"))
        assert_error(resp, 500, "generation_failed")
        assert "illegal memory access" not in resp.text
        try:
            w.proc.wait(15)
        except Exception:
            pytest.fail("a worker with a broken CUDA context kept running")
        assert w.proc.returncode == 3, f"exit code {w.proc.returncode}: supervision restarts on non-zero"
    finally:
        w.stop(5)
