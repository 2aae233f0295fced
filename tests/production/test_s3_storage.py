"""A real worker process storing its images in S3 (moto's server on a free port, a real HTTP endpoint).

What must hold: the image a worker reports is in the bucket and its image_url (presigned) serves it;
/images/{name} redirects there; b64_json answers carry the bytes; retention deletes old objects (and only
ours); a store that goes away makes generation a retryable 503 `storage_unavailable` (never a success
without an image) while /health keeps the worker in the balancer and says `storage: unavailable`; when the
store is back the worker recovers by itself.
"""
from __future__ import annotations

import base64
import io
import time

import httpx
import pytest
from PIL import Image

from api.storage import NAME_RE
from tests.production.conftest import QUICK_JOB, Worker, assert_error, assert_png, image_files, start_all, wait_until
from tests.s3server import AWS_ENV, MotoS3

BUCKET = "flux-fleet"
PREFIX = "images/prod"
IMAGE_TTL_S = 8


@pytest.fixture(scope="module")
def s3(workdir):
    server = MotoS3(workdir / "moto-prod.log").start()
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3_worker(workdir, s3):
    env = dict(AWS_ENV, FLUX_STORAGE_URL=f"s3://{BUCKET}/{PREFIX}", FLUX_S3_ENDPOINT_URL=s3.url,
               FLUX_IMAGE_URL_TTL_S="300", FLUX_IMAGE_TTL_S=str(IMAGE_TTL_S),
               FLUX_JOB_TTL_S="2")  # the retention sweep then runs every second
    w = Worker("s3", workdir, env)
    start_all(w)
    yield w
    w.stop()


def ensure_up(s3: MotoS3) -> None:
    """The outage test restarts the store empty: make sure it is up with its bucket before a test."""
    if not s3.proc or s3.proc.poll() is not None:
        s3.start()
    client = s3.client()
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)


def object_keys(s3: MotoS3, prefix: str = PREFIX + "/") -> list[str]:
    resp = s3.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"] for obj in resp.get("Contents", ()))


def image_name(url: str) -> str:
    name = url.split("?")[0].rsplit("/", 1)[-1]
    assert NAME_RE.fullmatch(name), url
    return name


def test_the_image_goes_to_the_bucket_and_its_presigned_url_serves_it(s3_worker, s3):
    ensure_up(s3)
    resp = s3_worker.client.post("/generate", json=QUICK_JOB)
    assert resp.status_code == 200, resp.text
    url = resp.json()["image_url"]
    assert url.startswith(f"{s3.url}/{BUCKET}/{PREFIX}/") and "X-Amz-Signature=" in url
    assert "X-Amz-Expires=300" in url
    name = image_name(url)
    assert f"{PREFIX}/{name}" in object_keys(s3)
    image = httpx.get(url, timeout=10)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert_png(image.content, 256, 256)
    assert [f for f in image_files(s3_worker.output_dir) if not f.startswith(".")] == []  # nothing on disk


def test_images_path_redirects_to_a_fresh_presigned_url_and_404s_unknown_names(s3_worker, s3):
    ensure_up(s3)
    name = image_name(s3_worker.client.post("/generate", json=QUICK_JOB).json()["image_url"])
    resp = s3_worker.client.get(f"/images/{name}", follow_redirects=False)
    assert resp.status_code == 307
    target = resp.headers["location"]
    assert target.startswith(f"{s3.url}/{BUCKET}/{PREFIX}/{name}?") and "X-Amz-Signature=" in target
    assert_png(httpx.get(target, timeout=10).content, 256, 256)
    for unknown in ["0" * 32 + ".png", "..%2F..%2Fetc%2Fpasswd", name.replace(".png", ".jpg"), "notes.txt"]:
        assert_error(s3_worker.client.get(f"/images/{unknown}", follow_redirects=False), 404)


def test_openai_b64_json_and_url_answers_work_with_s3(s3_worker, s3):
    ensure_up(s3)
    body = {"prompt": "a lighthouse", "size": "256x256", "n": 2, "response_format": "b64_json",
            "output_format": "jpeg"}
    resp = s3_worker.client.post("/v1/images/generations", json=body)
    assert resp.status_code == 200, resp.text
    for item in resp.json()["data"]:
        with Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) as img:
            assert img.format == "JPEG" and img.size == (256, 256)
    body.update(response_format="url", n=1)
    url = s3_worker.client.post("/v1/images/generations", json=body).json()["data"][0]["url"]
    assert httpx.get(url, timeout=10).content[:3] == b"\xff\xd8\xff"


def test_retention_deletes_old_objects_under_the_prefix_and_nothing_else(s3_worker, s3):
    ensure_up(s3)
    client = s3.client()
    foreign = [f"{PREFIX}/README.txt", f"other/{'1' * 32}.png"]
    for key in foreign:
        client.put_object(Bucket=BUCKET, Key=key, Body=b"not the worker's")
    name = image_name(s3_worker.client.post("/generate", json=QUICK_JOB).json()["image_url"])
    assert f"{PREFIX}/{name}" in object_keys(s3)
    wait_until(lambda: f"{PREFIX}/{name}" not in object_keys(s3), timeout=IMAGE_TTL_S + 20,
               what="the retention sweep to delete the image")
    assert all(client.head_object(Bucket=BUCKET, Key=key) for key in foreign)
    assert_error(s3_worker.client.get(f"/images/{name}", follow_redirects=False), 404)


@pytest.mark.timeout(180)
def test_a_store_that_goes_away_is_a_retryable_503_and_the_worker_recovers(s3_worker, s3):
    ensure_up(s3)
    assert s3_worker.client.post("/generate", json=QUICK_JOB).status_code == 200
    assert s3_worker.health().json()["storage"] == "ok"
    s3.stop()
    try:
        started = time.monotonic()
        resp = s3_worker.client.post("/generate", json=QUICK_JOB)
        error = assert_error(resp, 503, "storage_unavailable")
        assert error["retryable"] is True and int(resp.headers["retry-after"]) >= 1
        assert time.monotonic() - started < 30
        # the OpenAI route and an async job fail the same way; nothing reports success without an image
        assert_error(s3_worker.client.post("/v1/images/generations", json={"prompt": "x", "size": "256x256"}),
                     503, "storage_unavailable")
        job_id = s3_worker.client.post("/jobs", json=QUICK_JOB).json()["job_id"]
        job = wait_until(lambda: (j := s3_worker.client.get(f"/jobs/{job_id}").json())["status"] != "queued"
                         and j["status"] != "running" and j, timeout=60, what="the job to finish")
        assert job["status"] == "failed" and job["error"]["code"] == "storage_unavailable"
        # /images cannot tell "unknown" from "unreachable": 503, not 404
        assert_error(s3_worker.client.get(f"/images/{'0' * 32}.png", follow_redirects=False), 503,
                     "storage_unavailable")
        # the worker stays in the balancer (every worker shares the store) and says what is wrong
        health = s3_worker.health()
        assert health.status_code == 200 and health.json()["storage"] == "unavailable"
        assert s3_worker.client.get("/live").status_code == 200
    finally:
        ensure_up(s3)
    resp = s3_worker.client.post("/generate", json=QUICK_JOB)
    assert resp.status_code == 200, resp.text
    assert_png(httpx.get(resp.json()["image_url"], timeout=10).content, 256, 256)
    assert s3_worker.health().json()["storage"] == "ok"


@pytest.mark.timeout(180)
def test_a_store_that_hangs_fails_within_the_s3_timeout(workdir):
    """An endpoint that accepts connections and never answers (a hung store, a black-holed route): each call
    gives up after FLUX_S3_TIMEOUT_S, with one retry, so the client gets its retryable 503 in seconds, not
    after minutes of read timeouts and retries."""
    import socket
    import threading

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)
    held: list = []
    threading.Thread(target=lambda: [held.append(hung.accept()) for _ in iter(int, 1)], daemon=True).start()
    env = dict(AWS_ENV, FLUX_STORAGE_URL=f"s3://{BUCKET}/{PREFIX}",
               FLUX_S3_ENDPOINT_URL=f"http://127.0.0.1:{hung.getsockname()[1]}", FLUX_S3_TIMEOUT_S="2")
    w = Worker("s3-hung", workdir, env)
    start_all(w)
    try:
        for method, path, body in (("POST", "/generate", QUICK_JOB), ("GET", f"/images/{'0' * 32}.png", None)):
            started = time.monotonic()
            resp = w.client.request(method, path, json=body, timeout=40)
            took = time.monotonic() - started
            error = assert_error(resp, 503, "storage_unavailable")
            assert error["retryable"] is True and int(resp.headers["retry-after"]) >= 1
            assert took < 15, f"{method} {path} took {took:.1f}s"
    finally:
        w.stop()
        hung.close()
        for conn, _ in held:
            conn.close()
