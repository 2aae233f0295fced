"""S3ImageStore against a real S3 HTTP endpoint (moto's server): keys, uploads, URLs, reads, retention, outage."""
from __future__ import annotations

import io
import time

import httpx
import pytest
from PIL import Image

from api.errors import StorageUnavailable
from api.image_stores import make_image_store
from api.settings import Settings
from api.storage import NAME_RE, ImageStore, LocalImageStore
from api.storage_s3 import S3ImageStore
from tests.s3server import AWS_ENV, MotoS3

BUCKET = "flux-images"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = MotoS3(tmp_path_factory.mktemp("moto") / "moto.log").start()
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


@pytest.fixture
def aws_env(monkeypatch):
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def store(s3, aws_env, request):
    prefix = f"t/{request.node.name[:40]}"
    return S3ImageStore(f"s3://{BUCKET}/{prefix}", endpoint_url=s3.url, url_ttl_s=120)


def picture(width: int = 64, height: int = 48) -> Image.Image:
    return Image.new("RGB", (width, height), (20, 130, 90))


def keys(s3, prefix: str = "") -> list[str]:
    resp = s3.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"] for obj in resp.get("Contents", ()))


def test_the_factory_picks_the_store_from_the_settings(tmp_path, s3, aws_env):
    local = make_image_store(Settings(output_dir=str(tmp_path)))
    assert type(local) is LocalImageStore is ImageStore and not local.remote
    remote = make_image_store(Settings(storage_url=f"s3://{BUCKET}/a/b/", s3_endpoint_url=s3.url))
    assert isinstance(remote, S3ImageStore) and remote.remote
    assert (remote.bucket, remote.prefix) == (BUCKET, "a/b")


@pytest.mark.parametrize("url", ["gs://bucket/x", "s3://Bad_Bucket/x", "s3://ab", "s3://bucket/a/../b",
                                 "/var/images"])
def test_a_malformed_storage_url_is_refused_at_start_up(url):
    with pytest.raises(ValueError, match="FLUX_STORAGE_URL"):
        Settings(storage_url=url)


def test_save_uploads_one_complete_object_under_the_prefix_and_its_presigned_url_serves_it(store, s3):
    name = store.save(picture())
    assert NAME_RE.fullmatch(name)
    assert keys(s3, store.prefix + "/") == [f"{store.prefix}/{name}"]
    head = s3.client().head_object(Bucket=BUCKET, Key=store.key_for(name))
    assert head["ContentType"] == "image/png"
    url = store.url_for(name, "http://ignored")
    assert url.startswith(s3.url) and "X-Amz-Signature=" in url and "X-Amz-Expires=120" in url
    resp = httpx.get(url)
    assert resp.status_code == 200
    assert Image.open(io.BytesIO(resp.content)).size == (64, 48)
    assert store.read_bytes(name) == resp.content


@pytest.mark.parametrize("fmt,media", [("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_lossy_formats_carry_their_media_type(store, s3, fmt, media):
    name = store.save(picture(), fmt, 70)
    assert s3.client().head_object(Bucket=BUCKET, Key=store.key_for(name))["ContentType"] == media


def test_a_public_base_url_replaces_the_presigned_url(s3, aws_env):
    store = S3ImageStore(f"s3://{BUCKET}/pub", endpoint_url=s3.url,
                         public_base_url="https://cdn.example.com/images/")
    name = store.save(picture())
    assert store.url_for(name, "http://x") == f"https://cdn.example.com/images/pub/{name}"


def test_lookups_take_only_server_made_names(store):
    name = store.save(picture())
    assert store.redirect_url(name) is not None
    for bad in ["../" + name, name.upper(), "x" + name, f"{store.prefix}/{name}", "", "a" * 32 + ".gif"]:
        assert store.redirect_url(bad) is None
        assert store.read_bytes(bad) is None
    assert store.redirect_url("0" * 32 + ".png") is None  # well formed, never made: 404


def test_delete_does_not_block_and_removes_the_object(store, s3):
    name = store.save(picture())
    store.delete(name)
    deadline = time.monotonic() + 10
    while keys(s3, store.key_for(name)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert keys(s3, store.key_for(name)) == []


def test_the_sweep_deletes_only_our_old_images_under_the_prefix(store, s3):
    names = [store.save(picture()) for _ in range(3)]
    client = s3.client()
    foreign = [f"{store.prefix}/notes.txt", f"{store.prefix}/sub/{names[0]}", f"elsewhere/{names[1]}"]
    for key in foreign:
        client.put_object(Bucket=BUCKET, Key=key, Body=b"not ours")
    assert store.sweep(max_age_s=3600) == 0  # all young
    assert store.sweep(max_age_s=60, now=time.time() + 120) == 3
    remaining = sorted(keys(s3, store.prefix + "/") + keys(s3, "elsewhere/"))
    assert remaining == sorted(foreign)


def test_the_sweep_pages_through_more_than_one_listing(store, s3):
    client = s3.client()
    for i in range(1005):  # past one page of list_objects_v2 and one DeleteObjects call
        client.put_object(Bucket=BUCKET, Key=f"{store.prefix}/{i:032x}.png", Body=b"x")
    assert store.sweep(max_age_s=1, now=time.time() + 60) == 1005
    assert keys(s3, store.prefix + "/") == []


def test_an_unreachable_store_fails_the_upload_with_a_retryable_503_and_recovers(aws_env, tmp_path):
    server = MotoS3(tmp_path / "moto.log").start()
    try:
        server.client().create_bucket(Bucket=BUCKET)
        store = S3ImageStore(f"s3://{BUCKET}/x", endpoint_url=server.url)
        store.save(picture())
        server.stop()
        started = time.monotonic()
        with pytest.raises(StorageUnavailable) as caught:
            store.save(picture())
        assert time.monotonic() - started < 20  # a few quick retries, not minutes
        assert caught.value.status == 503 and caught.value.retryable and caught.value.code == "storage_unavailable"
        assert store.last_error
        with pytest.raises(StorageUnavailable):
            store.redirect_url("0" * 32 + ".png")  # "cannot tell", not "no such image"
        assert store.sweep(1, now=time.time() + 10) == 0  # logged, never raised into the sweeper
        server.start()
        server.client().create_bucket(Bucket=BUCKET)
        name = store.save(picture())
        assert store.last_error is None and store.read_bytes(name)[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        server.stop()


def test_an_image_named_in_a_request_is_read_from_the_bucket(store):
    """`image`: the name of an image this service made; with S3 storage the lookup took a local path (a 500)."""
    from api.errors import InvalidRequest
    from api.inputs import image_bytes

    name = store.save(picture())
    assert image_bytes(name, "image", store, 10_000_000) == store.read_bytes(name)
    gone = name[:-36] + "0" * 32 + ".png"
    with pytest.raises(InvalidRequest, match="no image named"):
        image_bytes(gone, "mask", store, 10_000_000)
