"""Async jobs on a real worker: POST /jobs → queued (position, ETA) → running (step k of n) → succeeded,
cancellation of queued and running jobs, unknown ids, Server-Sent Events, and expiry after FLUX_JOB_TTL_S."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.production.conftest import (LONG_JOB, QUICK_JOB, Worker, assert_error, assert_png, image_files,
                                       job_state, sse_events, start_all, submit_job, wait_job, wait_until)


def start_blocker(worker: Worker, min_step: int = 1) -> str:
    """A long job that holds the (only) pipeline; returns once it has run a few denoising steps."""
    job_id = submit_job(worker, LONG_JOB)
    wait_job(worker, job_id, lambda v: v["status"] == "running" and v["step"] >= min_step, 30,
             "the blocker job to be running")
    return job_id


def test_job_lifecycle_ends_with_the_generate_response(idle_worker):
    w = idle_worker
    body = dict(QUICK_JOB, seed=1234)
    resp = w.client.post("/jobs", json=body)
    assert resp.status_code == 202, resp.text
    created = resp.json()
    job_id = created["job_id"]
    assert job_id.startswith(f"{w.port}-"), "job ids carry the worker id so a proxy can route them"
    assert created["status_url"] == f"/jobs/{job_id}"
    assert resp.headers["location"] == created["status_url"]
    assert created["status"] in ("queued", "running", "succeeded")

    view = wait_job(w, job_id, lambda v: v["status"] == "succeeded", 30, "the job to succeed")
    result = view["result"]
    for key in ("image_url", "seed", "width", "height", "num_inference_steps", "model", "precision", "gpu",
                "queue_ms", "generate_ms", "request_id", "job_id"):
        assert key in result, f"{key} missing from the job result {result}"
    assert (result["seed"], result["width"], result["height"]) == (1234, 256, 256)
    assert result["job_id"] == job_id and result["gpu"] == 1
    image = httpx.get(result["image_url"], timeout=10)
    assert image.status_code == 200
    assert_png(image.content, 256, 256)

    # cancelling a finished job changes nothing
    again = w.client.delete(f"/jobs/{job_id}")
    assert again.status_code == 200 and again.json()["status"] == "succeeded"
    assert httpx.get(result["image_url"], timeout=10).status_code == 200


def test_queued_jobs_report_position_and_eta(idle_worker):
    w = idle_worker
    blocker = start_blocker(w)
    # different sizes: neither can join the blocker's batch, nor each other's
    first = submit_job(w, dict(QUICK_JOB, num_inference_steps=2))
    second = submit_job(w, dict(QUICK_JOB, num_inference_steps=3))
    a, b = job_state(w, first), job_state(w, second)
    assert (a["status"], a["position"]) == ("queued", 1), a
    assert (b["status"], b["position"]) == ("queued", 2), b
    assert a["eta_s"] > 0 and b["eta_s"] > a["eta_s"], (a, b)

    running = job_state(w, blocker)
    assert running["status"] == "running" and running["total_steps"] == LONG_JOB["num_inference_steps"]
    assert 1 <= running["step"] < running["total_steps"]
    later = wait_job(w, blocker, lambda v: v["step"] > running["step"], 10, "the step counter to advance")
    assert later["status"] == "running"


def test_delete_of_a_queued_job_removes_it_from_the_queue(idle_worker):
    w = idle_worker
    generated_before = w.stats()["images_generated"]
    blocker = start_blocker(w)
    doomed = submit_job(w, dict(QUICK_JOB, num_inference_steps=2))
    kept = submit_job(w, dict(QUICK_JOB, num_inference_steps=3))

    resp = w.client.delete(f"/jobs/{doomed}")
    assert resp.status_code == 200
    view = resp.json()
    assert view["status"] == "cancelled" and view["error"]["code"] == "cancelled", view
    assert job_state(w, kept)["position"] == 1
    assert w.stats()["queued"] == 1

    w.client.delete(f"/jobs/{blocker}")
    wait_job(w, kept, lambda v: v["status"] == "succeeded", 30, "the remaining job to succeed")
    assert job_state(w, doomed)["status"] == "cancelled"
    assert w.stats()["images_generated"] == generated_before + 1, "only the kept job may be rendered"


def test_delete_of_a_running_job_stops_it_at_the_next_step_and_frees_the_pipeline(idle_worker):
    w = idle_worker
    stats_before = w.stats()
    files_before = set(image_files(w.output_dir))
    blocker = start_blocker(w, min_step=2)
    follower = submit_job(w, QUICK_JOB)

    started = time.monotonic()
    resp = w.client.delete(f"/jobs/{blocker}")
    cancel_s = time.monotonic() - started
    assert resp.status_code == 200
    view = resp.json()
    assert view["status"] == "cancelled", view
    # a step takes ~0.15 s here; the full job would take ~15 s
    assert cancel_s < 3, f"DELETE took {cancel_s:.1f} s: the job did not stop at the next step"

    done = wait_job(w, follower, lambda v: v["status"] == "succeeded", 10, "the next job to run at once")
    assert done["result"]["queue_ms"] < 10_000
    stats = w.stats()
    assert stats["running"] == 0 and stats["queued"] == 0
    assert stats["cancelled"] == stats_before["cancelled"] + 1
    assert stats["images_generated"] == stats_before["images_generated"] + 1
    new_files = set(image_files(w.output_dir)) - files_before
    assert len(new_files) == 1, f"only the follower's image may be written: {new_files}"


@pytest.mark.parametrize("method,path", [
    ("GET", "/jobs/no-such-job"),
    ("DELETE", "/jobs/no-such-job"),
    ("GET", "/jobs/no-such-job/events"),
    ("GET", "/jobs/9999-0123456789abcdef01234567"),
])
def test_unknown_job_id_is_404_json(worker, method, path):
    error = assert_error(worker.client.request(method, path), 404, "not_found")
    assert error["field"] == "job_id"


def test_event_stream_follows_a_job_from_queue_to_done(idle_worker):
    w = idle_worker
    blocker = start_blocker(w)
    ahead = submit_job(w, dict(QUICK_JOB, num_inference_steps=2))
    # 1024x1024 steps take ~0.15 s each: the stream (polled every 0.1 s) sees them one by one
    watched = submit_job(w, dict(LONG_JOB, num_inference_steps=6))

    lines: list[str] = []

    def read():
        with httpx.stream("GET", f"{w.url}/jobs/{watched}/events", timeout=60) as resp:
            lines.append(f"status:{resp.status_code}:{resp.headers.get('content-type', '')}")
            for line in resp.iter_lines():
                lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    wait_until(lambda: any(line.startswith("event: queued") for line in lines), 10, what="the first event")
    w.client.delete(f"/jobs/{ahead}")      # watched moves from position 2 to 1
    wait_until(lambda: any(name == "queued" and data["position"] == 1 for name, data in sse_events(list(lines[1:]))),
               10, what="the stream to tell position 1")
    w.client.delete(f"/jobs/{blocker}")    # watched starts
    reader.join(60)
    assert not reader.is_alive(), "the stream did not end after the job finished"

    assert lines[0].startswith("status:200:text/event-stream"), lines[0]
    events = sse_events(lines[1:])
    names = [name for name, _ in events]
    assert names[-1] == "done" and names[-2] == "succeeded", names

    order = {"queued": 0, "running": 1, "succeeded": 2, "done": 3}
    assert [order[n] for n in names] == sorted(order[n] for n in names), f"events out of order: {names}"
    positions = [data["position"] for name, data in events if name == "queued"]
    assert positions[0] == 2 and positions[-1] == 1, positions
    assert positions == sorted(positions, reverse=True)
    steps = [data["step"] for name, data in events if name == "running"]
    assert any(step >= 1 for step in steps), f"no step progress in {steps}"
    assert steps == sorted(steps) and all(data["total_steps"] == 6 for name, data in events if name == "running")
    final = events[-2][1]
    assert final["result"]["image_url"].endswith(".png") and final["result"]["job_id"] == watched


# ---- expiry ------------------------------------------------------------------------------------------
JOB_TTL_S = 2


@pytest.fixture(scope="module")
def short_ttl_worker(workdir):
    w = Worker("short-ttl", workdir, {"FLUX_JOB_TTL_S": str(JOB_TTL_S)})
    start_all(w)
    yield w
    w.stop()


def test_finished_jobs_expire_with_their_images(short_ttl_worker):
    w = short_ttl_worker
    job_id = submit_job(w, QUICK_JOB)
    done = wait_job(w, job_id, lambda v: v["status"] == "succeeded", 30, "the job to succeed")
    finished = time.monotonic()
    image_url = done["result"]["image_url"]
    name = image_url.rsplit("/", 1)[1]
    assert httpx.get(image_url, timeout=10).status_code == 200
    assert (w.output_dir / name).is_file()

    # a sync /generate image is not a job's: the job TTL must leave it alone
    sync = w.client.post("/generate", json=QUICK_JOB)
    assert sync.status_code == 200
    sync_name = sync.json()["image_url"].rsplit("/", 1)[1]

    wait_until(lambda: w.client.get(f"/jobs/{job_id}").status_code == 404, JOB_TTL_S + 10, 0.2,
               "the finished job to expire")
    assert time.monotonic() - finished >= JOB_TTL_S * 0.9, "the job vanished before its TTL"
    assert_error(w.client.get(f"/jobs/{job_id}"), 404, "not_found")
    assert_error(httpx.get(image_url, timeout=10), 404, "not_found")
    assert not (w.output_dir / name).exists(), "the expired job's image is still on disk"
    assert (w.output_dir / sync_name).is_file(), "the TTL of async jobs deleted a /generate image"
