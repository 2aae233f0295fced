"""SIGTERM under load: readiness turns 503 at once, new work is refused with 503 JSON, every accepted request
is answered, and the process exits within FLUX_DRAIN_TIMEOUT (plus interpreter teardown)."""
from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import time

import httpx
import pytest

from tests.production.conftest import LONG_JOB, QUICK_JOB, Worker, assert_error, start_all, wait_until

EXIT_SLACK_S = 10  # after the drain: uvicorn's shutdown and the interpreter's teardown (torch) on a busy CPU


def post_all(worker: Worker, bodies: list[dict], *, first_running: bool = False
             ) -> tuple[concurrent.futures.Executor, list]:
    """POSTs the bodies concurrently. first_running: the first body is on the GPU before the others are sent
    (concurrent requests reach the worker in any order, so only then is it known which one runs)."""
    pool = concurrent.futures.ThreadPoolExecutor(len(bodies))
    client = httpx.Client(base_url=worker.url, timeout=120, limits=httpx.Limits(max_connections=len(bodies)))
    futures = [pool.submit(client.post, "/generate", json=bodies[0])]
    if first_running:
        wait_until(lambda: worker.stats()["running"] == 1, 20, what="the first request running")
    return pool, futures + [pool.submit(client.post, "/generate", json=body) for body in bodies[1:]]


def accepted(worker: Worker, count: int) -> bool:
    s = worker.stats()
    return s["queued"] + s["running"] + s["completed"] + s["failed"] >= count


@pytest.mark.timeout(120)
def test_sigterm_under_load_answers_every_accepted_request(workdir):
    drain_timeout = 30
    w = Worker("drain", workdir, {"FLUX_DRAIN_TIMEOUT": str(drain_timeout)})
    start_all(w)
    try:
        completed_before = w.stats()["completed"]
        # ~0.4 s each, two at a time: about 3 s of accepted work when the signal comes
        bodies = [dict(QUICK_JOB, width=512, height=512, num_inference_steps=12, seed=i) for i in range(12)]
        pool, futures = post_all(w, bodies)
        wait_until(lambda: accepted(w, completed_before + len(bodies)), 20, what="every request to be accepted")

        signalled = time.monotonic()
        w.signal(signal.SIGTERM)
        health = w.health()
        assert health.status_code == 503 and health.json()["status"] == "draining", health.text
        assert_error(w.client.post("/generate", json=QUICK_JOB), 503, "draining")
        assert_error(w.client.post("/jobs", json=QUICK_JOB), 503, "draining")
        assert_error(w.client.post("/v1/images/generations", json={"prompt": "x", "size": "256x256"}), 503,
                     "draining")
        assert w.stats()["queued"] > 0, "the work was done before the refusals were checked; add more"

        answers = [f.result(timeout=60) for f in futures]
        pool.shutdown()
        assert [a.status_code for a in answers] == [200] * len(bodies), [a.text[:200] for a in answers]
        assert len({a.json()["image_url"] for a in answers}) == len(bodies)

        try:
            w.proc.wait(drain_timeout + EXIT_SLACK_S)
        except subprocess.TimeoutExpired:
            pytest.fail("the worker did not exit after draining")
        exit_s = time.monotonic() - signalled
        assert w.proc.returncode == 0, w.log_tail()
        assert exit_s < drain_timeout, f"exited {exit_s:.1f} s after SIGTERM with a drained queue"
    finally:
        w.stop(5)


@pytest.mark.timeout(120)
def test_sigterm_exits_by_the_drain_deadline_and_still_answers_everyone(workdir):
    """Work that cannot finish in time is cut at the deadline: its clients get a JSON error, not a reset."""
    drain_timeout = 3
    w = Worker("drain-deadline", workdir, {"FLUX_DRAIN_TIMEOUT": str(drain_timeout)})
    start_all(w)
    try:
        bodies = [LONG_JOB, dict(LONG_JOB, seed=2, num_inference_steps=99), dict(QUICK_JOB, seed=3)]
        pool, futures = post_all(w, bodies, first_running=True)
        wait_until(lambda: w.stats()["running"] == 1 and w.stats()["queued"] == 2, 20,
                   what="one request running, two waiting")
        signalled = time.monotonic()
        w.signal(signal.SIGTERM)
        try:
            w.proc.wait(drain_timeout + EXIT_SLACK_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {drain_timeout + EXIT_SLACK_S} s after SIGTERM with FLUX_DRAIN_TIMEOUT="
                        f"{drain_timeout} (a ~15 s job was running)")
        exit_s = time.monotonic() - signalled
        answers = []
        for future in futures:
            try:
                answers.append(future.result(timeout=5))
            except httpx.HTTPError as exc:
                answers.append(exc)
        pool.shutdown()
        dropped = [a for a in answers if not isinstance(a, httpx.Response)]
        assert not dropped, f"accepted requests got no answer: {dropped}"
        for answer in answers:
            assert_error(answer, (503, 504))
        assert exit_s < drain_timeout + EXIT_SLACK_S
    finally:
        w.stop(5)
