"""Jobs outlive a restart of their worker (the SQLite JobStore in FLUX_STATE_DIR): a finished job is still
readable with its image after a graceful restart, an Idempotency-Key still finds its job, a job that was
queued or running when the worker stopped reads as failed with a retryable error (never 404), and a job's
record and image expire together at FLUX_JOB_TTL_S."""
from __future__ import annotations

import signal
import time
import uuid

import httpx
import pytest

from tests.production.conftest import LONG_JOB, QUICK_JOB, Worker, start_all, wait_job


def restartable(workdir, name: str, **env) -> Worker:
    # the worker id names its job ids and its state file: it stays the same across restarts, the port not
    base = {"FLUX_WORKER_ID": name.replace("-", "_")}
    base.update(env)
    return Worker(name, workdir, base)


def test_a_finished_job_is_readable_after_a_graceful_restart(workdir):
    name = f"persist-{uuid.uuid4().hex[:6]}"
    first = restartable(workdir, name)
    start_all(first)
    key = {"Idempotency-Key": f"persist-{uuid.uuid4().hex}"}
    try:
        created = first.client.post("/jobs", json=QUICK_JOB, headers=key)
        assert created.status_code == 202, created.text
        job_id = created.json()["job_id"]
        done = wait_job(first, job_id, lambda v: v["status"] == "succeeded", 60, "the job to finish")
    finally:
        assert first.stop() == 0
    second = restartable(workdir, name)
    start_all(second)
    try:
        after = second.client.get(f"/jobs/{job_id}")
        assert after.status_code == 200, after.text
        view = after.json()
        assert view["status"] == "succeeded"
        for field in ("seed", "width", "height", "num_inference_steps", "job_id", "output_format", "generate_ms"):
            assert view["result"][field] == done["result"][field], field
        image = httpx.get(f"{second.url}/images/{view['result']['image_url'].rsplit('/', 1)[1]}")
        assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
        # the Idempotency-Key survived too: the same request is the same job, not a second image
        retry = second.client.post("/jobs", json=QUICK_JOB, headers=key)
        assert retry.status_code == 200 and retry.json()["job_id"] == job_id
        assert second.stats()["images_generated"] == 0
    finally:
        second.stop()


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_unfinished_jobs_read_as_failed_and_retryable_after_a_restart(workdir, how):
    name = f"crash-{how.lower()}-{uuid.uuid4().hex[:6]}"
    first = restartable(workdir, name, FLUX_MAX_CONCURRENT="1", FLUX_DRAIN_TIMEOUT="1")
    start_all(first)
    running = first.client.post("/jobs", json=LONG_JOB).json()["job_id"]
    wait_job(first, running, lambda v: v["status"] == "running", 30, "the long job to run")
    queued = first.client.post("/jobs", json=QUICK_JOB).json()["job_id"]
    first.signal(getattr(signal, how))
    first.proc.wait(60)
    first.stop()
    second = restartable(workdir, name)
    start_all(second)
    try:
        for job_id in (running, queued):
            resp = second.client.get(f"/jobs/{job_id}")
            assert resp.status_code == 200, resp.text
            view = resp.json()
            assert view["status"] == "failed", view
            assert view["error"]["retryable"] is True, view
            if how == "SIGKILL":  # nobody answered it: the restart does
                assert view["error"]["code"] == "worker_restarted", view
    finally:
        second.stop()


def test_records_and_images_expire_together(workdir):
    name = f"expire-{uuid.uuid4().hex[:6]}"
    first = restartable(workdir, name, FLUX_JOB_TTL_S="3")
    start_all(first)
    try:
        job_id = first.client.post("/jobs", json=QUICK_JOB).json()["job_id"]
        view = wait_job(first, job_id, lambda v: v["status"] == "succeeded", 60, "the job to finish")
        image = first.output_dir / view["result"]["image_url"].rsplit("/", 1)[1]
        assert image.is_file()
    finally:
        first.stop()
    time.sleep(3.5)  # expired while the worker was down: the next start deletes both
    second = restartable(workdir, name, FLUX_JOB_TTL_S="3")
    start_all(second)
    try:
        assert second.client.get(f"/jobs/{job_id}").status_code == 404
        assert not image.exists()
        # and while it runs: the sweep deletes both
        job_id = second.client.post("/jobs", json=QUICK_JOB).json()["job_id"]
        view = wait_job(second, job_id, lambda v: v["status"] == "succeeded", 60, "the job to finish")
        image = second.output_dir / view["result"]["image_url"].rsplit("/", 1)[1]
        deadline = time.monotonic() + 15
        while second.client.get(f"/jobs/{job_id}").status_code != 404 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert second.client.get(f"/jobs/{job_id}").status_code == 404
        assert not image.exists()
    finally:
        second.stop()
    third = restartable(workdir, name, FLUX_JOB_TTL_S="3600")
    start_all(third)
    try:  # the expired record is gone from the file too, not only from memory
        assert third.client.get(f"/jobs/{job_id}").status_code == 404
    finally:
        third.stop()
