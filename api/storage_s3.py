"""S3ImageStore: images in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW...) shared by every worker.

Chosen with FLUX_STORAGE_URL=s3://bucket/prefix (see api/image_stores.py). Names are the same server-made
32-hex names as on disk; an object's key is `<prefix>/<name>`, and nothing but such a name ever becomes a key.

- An object exists only once its single PUT succeeded (S3 has no partial objects), so a failed upload leaves
  nothing to serve and is answered 503 `storage_unavailable` (retryable): never an image reported as stored
  that is not.
- image_url is a presigned GET URL valid FLUX_IMAGE_URL_TTL_S, or FLUX_S3_PUBLIC_BASE_URL + key for a
  public bucket or a CDN in front of it.
- Credentials come from boto3's default chain (AWS_* variables, shared config, instance/pod roles): the
  worker's settings never hold secrets of their own.
- Every call is blocking network I/O: save/read/sweep run in worker threads (the queue's I/O pool,
  asyncio.to_thread); delete, which the event loop calls, is handed to a small pool of its own.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from urllib.parse import quote

from api.errors import StorageUnavailable
from api.storage import MEDIA_TYPE, NAME_RE, ImageStore

log = logging.getLogger(__name__)

# A listing of the whole prefix costs one request per 1000 objects on every worker: sweep at most this often
# (an S3 lifecycle rule is the better tool in production; see docs/OPERATIONS.md)
MIN_SWEEP_INTERVAL_S = 300.0


def parse_s3_url(url: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix"); the prefix may be empty."""
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix.strip("/")


class S3ImageStore:
    remote = True

    def __init__(self, url: str, *, endpoint_url: str | None = None, region: str | None = None,
                 addressing_style: str = "auto", url_ttl_s: int = 3600, public_base_url: str | None = None,
                 compress_level: int = 1, name_prefix: str = "", client=None, timeout_s: float = 10.0):
        self.bucket, self.prefix = parse_s3_url(url)
        self.name_prefix = name_prefix  # of image names (the worker's id), not of keys
        self.url_ttl_s = int(url_ttl_s)
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.compress_level = compress_level
        self.client = client if client is not None else self._make_client(endpoint_url, region, addressing_style,
                                                                           timeout_s)
        self._deleter = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="s3-delete")
        self._lock = threading.Lock()
        self._next_sweep = 0.0
        # what the last call to the bucket said: /health reports it (a shared bucket that is down is not a
        # reason to pull every worker out of the balancer; the uploads answer 503 storage_unavailable)
        self.last_error: str | None = None

    @staticmethod
    def _make_client(endpoint_url: str | None, region: str | None, addressing_style: str, timeout_s: float = 10.0):
        try:  # optional dependency: only a worker with FLUX_STORAGE_URL=s3://... needs it
            import boto3
            from botocore.config import Config
        except ImportError:
            raise RuntimeError("FLUX_STORAGE_URL=s3://... needs boto3: pip install boto3") from None

        if addressing_style == "auto" and endpoint_url:
            addressing_style = "path"  # MinIO and most self-hosted stores have no per-bucket DNS names
        config = Config(
            connect_timeout=timeout_s, read_timeout=timeout_s,
            # one quick retry rides out a blip; a store that refuses fails the upload at once, one that hangs
            # (accepts and never answers) within about 2 x FLUX_S3_TIMEOUT_S, and the client retries on our 503
            # rather than waiting minutes (30 s reads with 3 attempts held a request over two minutes)
            retries={"total_max_attempts": 2, "mode": "standard"},  # the first call and one retry
            s3={"addressing_style": addressing_style},
            signature_version="s3v4",
        )
        return boto3.client("s3", endpoint_url=endpoint_url or None, region_name=region or None, config=config)

    # ---- names and keys --------------------------------------------------------------------------
    new_name = staticmethod(ImageStore.new_name)
    media_type = staticmethod(ImageStore.media_type)

    def key_for(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def ensure(self) -> None:
        """Nothing to create: the bucket is the operator's (its access is checked by the first upload)."""
        log.info("images go to %s", self.location)

    def _ok(self) -> None:
        self.last_error = None

    def _failed(self, what: str, exc: Exception) -> StorageUnavailable:
        self.last_error = f"{what}: {type(exc).__name__}"
        log.error("image store %s: %s failed: %s", self.location, what, exc)
        return StorageUnavailable("the image store is unavailable; try again shortly", retry_after=5)

    # ---- the interface ---------------------------------------------------------------------------
    # The same encoding as on disk (formats, quality, zlib level, names): ImageStore.save needs only
    # new_name, compress_level and write_bytes, and write_bytes here is the upload. Runs in the queue's I/O pool.
    save = ImageStore.save

    def write_bytes(self, name: str, data: bytes) -> None:
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"not a server-made image name: {name!r}")
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key_for(name), Body=data,
                                   ContentType=MEDIA_TYPE[name.rsplit(".", 1)[-1]],
                                   CacheControl="public, max-age=86400")
        except Exception as exc:  # botocore's connection, timeout and ClientError alike: nothing was stored
            raise self._failed(f"upload of {name}", exc) from None
        self._ok()

    def url_for(self, name: str, base_url: str) -> str:
        """The image_url of a response: the public base + key, else a presigned GET (no network call)."""
        key = self.key_for(name)
        if self.public_base_url:
            return f"{self.public_base_url}/{quote(key)}"
        return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key},
                                                  ExpiresIn=self.url_ttl_s)

    def exists(self, name: str) -> bool:
        """Whether the image is in the bucket (404 → False); a store that cannot answer raises 503."""
        if not NAME_RE.fullmatch(name):
            return False
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key_for(name))
        except Exception as exc:
            if _is_not_found(exc):
                self._ok()
                return False
            raise self._failed(f"lookup of {name}", exc) from None
        self._ok()
        return True

    def redirect_url(self, name: str, base_url: str = "") -> str | None:
        """Where GET /images/{name} sends the client (307), or None for an unknown image. Blocking."""
        return self.url_for(name, base_url) if self.exists(name) else None

    def read_bytes(self, name: str) -> bytes | None:
        """The stored bytes (b64_json answers), or None when the image is not there. Blocking."""
        if not NAME_RE.fullmatch(name):
            return None
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key_for(name))
            data = obj["Body"].read()
        except Exception as exc:
            if _is_not_found(exc):
                return None
            raise self._failed(f"download of {name}", exc) from None
        self._ok()
        return data

    def delete(self, name: str) -> None:
        """Best effort and non-blocking (the event loop calls it): a failed delete is left to the sweep or the
        bucket's lifecycle rule."""
        if NAME_RE.fullmatch(name):
            self._deleter.submit(self._delete_now, name)

    def _delete_now(self, name: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key_for(name))
        except Exception as exc:
            log.warning("could not delete %s from %s: %s", name, self.location, exc)

    def sweep(self, max_age_s: float, now: float | None = None) -> int:
        """Delete our images under the prefix older than max_age_s; returns how many went. Only server-made
        names directly under the prefix are touched: anything else in the bucket is not ours. Several
        workers sweeping the same prefix at once is harmless (deleting a deleted key succeeds)."""
        explicit = now is not None
        now = time.time() if now is None else now
        with self._lock:
            if not explicit and time.monotonic() < self._next_sweep:
                return 0
            self._next_sweep = time.monotonic() + min(MIN_SWEEP_INTERVAL_S, max(1.0, max_age_s / 2))
        start = f"{self.prefix}/" if self.prefix else ""
        removed = 0
        try:
            batch: list[dict] = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                for obj in page.get("Contents", ()):
                    rest = obj["Key"][len(start):]
                    if NAME_RE.fullmatch(rest) and now - obj["LastModified"].timestamp() > max_age_s:
                        batch.append({"Key": obj["Key"]})
                    if len(batch) == 1000:  # the most one DeleteObjects takes
                        removed += self._delete_batch(batch)
                        batch = []
            if batch:
                removed += self._delete_batch(batch)
        except Exception as exc:
            self._failed("retention sweep", exc)
            return removed
        return removed

    def _delete_batch(self, batch: list[dict]) -> int:
        resp = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        errors = resp.get("Errors", [])
        for err in errors[:5]:
            log.warning("could not delete %s: %s", err.get("Key"), err.get("Code"))
        return len(batch) - len(errors)

    def close(self) -> None:
        self._deleter.shutdown(wait=True)


def _is_not_found(exc: Exception) -> bool:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("404", "NoSuchKey", "NotFound") or status == 404
