"""Idempotency-Key on POST /generate and POST /jobs: a retry gets the first attempt's result (or its running
job), never a second generation; the same key with a different body is a 409."""
from __future__ import annotations

import concurrent.futures
import json
import socket
import uuid

import pytest

from tests.production.conftest import LONG_JOB, QUICK_JOB, assert_error, submit_job, wait_job, wait_until


def key() -> str:
    return f"test-{uuid.uuid4().hex}"


def test_generate_retry_with_the_same_key_returns_the_same_image(idle_worker):
    w = idle_worker
    k = key()
    before = w.stats()["images_generated"]
    body = {"prompt": "idempotent", "width": 256, "height": 256, "num_inference_steps": 1}  # no seed: drawn
    first = w.client.post("/generate", json=body, headers={"Idempotency-Key": k})
    second = w.client.post("/generate", json=body, headers={"Idempotency-Key": k})
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    a, b = first.json(), second.json()
    assert (a["job_id"], a["image_url"], a["seed"]) == (b["job_id"], b["image_url"], b["seed"])
    assert w.stats()["images_generated"] == before + 1

    # without a key, the same body is a new generation
    third = w.client.post("/generate", json=body)
    assert third.status_code == 200 and third.json()["job_id"] != a["job_id"]


def test_concurrent_retries_share_one_generation(idle_worker):
    w = idle_worker
    k = key()
    before = w.stats()["images_generated"]
    body = {"prompt": "raced", "width": 512, "height": 512, "num_inference_steps": 8}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: w.client.post("/generate", json=body, headers={"Idempotency-Key": k}),
                                  range(4)))
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert len({r.json()["job_id"] for r in responses}) == 1
    assert w.stats()["images_generated"] == before + 1


def test_jobs_retry_returns_the_same_queued_then_finished_job(idle_worker):
    w = idle_worker
    k = key()
    blocker = submit_job(w, LONG_JOB)
    wait_job(w, blocker, lambda v: v["status"] == "running", 30, "the blocker to run")
    first = w.client.post("/jobs", json=QUICK_JOB, headers={"Idempotency-Key": k})
    assert first.status_code == 202
    job_id = first.json()["job_id"]
    w.open_jobs.append(job_id)
    retry = w.client.post("/jobs", json=QUICK_JOB, headers={"Idempotency-Key": k})
    assert retry.status_code == 200, "a retry is not a new job: 200, not 202"
    assert retry.json()["job_id"] == job_id and retry.json()["status"] == "queued"
    assert w.stats()["queued"] == 1

    w.client.delete(f"/jobs/{blocker}")
    done = wait_job(w, job_id, lambda v: v["status"] == "succeeded", 30, "the job to succeed")
    late = w.client.post("/jobs", json=QUICK_JOB, headers={"Idempotency-Key": k})
    assert late.status_code == 200
    assert late.json()["job_id"] == job_id
    assert late.json()["result"]["image_url"] == done["result"]["image_url"]


@pytest.mark.parametrize("route", ["/generate", "/jobs"])
def test_same_key_with_a_different_body_is_409(idle_worker, route):
    w = idle_worker
    k = key()
    first = w.client.post(route, json=QUICK_JOB, headers={"Idempotency-Key": k})
    assert first.status_code in (200, 202), first.text
    if route == "/jobs":
        w.open_jobs.append(first.json()["job_id"])
    before = w.stats()["images_generated"]
    other = w.client.post(route, json=dict(QUICK_JOB, prompt="something else"), headers={"Idempotency-Key": k})
    error = assert_error(other, 409, "conflict")
    assert error["field"] == "Idempotency-Key"
    # the same key on the other route is a different request too
    elsewhere = "/jobs" if route == "/generate" else "/generate"
    assert_error(w.client.post(elsewhere, json=QUICK_JOB, headers={"Idempotency-Key": k}), 409, "conflict")
    assert w.stats()["images_generated"] == before


@pytest.mark.parametrize("bad", ["", "x" * 201])
def test_malformed_idempotency_key_is_422(worker, bad):
    resp = worker.client.post("/generate", json=QUICK_JOB, headers={"Idempotency-Key": bad})
    assert assert_error(resp, 422, "invalid_request")["field"] == "Idempotency-Key"


def test_two_idempotency_keys_are_422_never_one_picked(worker):
    # nginx picks the worker by hashing the header; a newer nginx hashes two of them joined ("a, b"): the worker
    # using only the first would let a retry sending "a" alone land elsewhere and render a second image
    resp = worker.client.post("/jobs", json=QUICK_JOB,
                              headers=[("Idempotency-Key", "a-1"), ("Idempotency-Key", "b-2")])
    assert assert_error(resp, 422, "invalid_request")["field"] == "Idempotency-Key"


def test_retry_after_a_dropped_connection_generates_the_image(idle_worker):
    """The usual reason to retry: the connection broke. The first attempt was cancelled when the client went
    away, so the retry with the same key must render the image rather than replay "cancelled"."""
    w = idle_worker
    k = key()
    body = dict(LONG_JOB, width=768, height=768, num_inference_steps=40)  # ~2.5 s
    raw = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", w.port))
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Idempotency-Key: " + k.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(raw) + raw)
    wait_until(lambda: w.stats()["running"] == 1, 20, what="the first attempt to run")
    cancelled = w.stats()["cancelled"]
    sock.close()
    wait_until(lambda: w.stats()["cancelled"] == cancelled + 1, 10, what="the abandoned attempt to be cancelled")

    retry = w.client.post("/generate", json=body, headers={"Idempotency-Key": k})
    assert retry.status_code == 200, retry.text
    assert retry.json()["image_url"].endswith(".png")
