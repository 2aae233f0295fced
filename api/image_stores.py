"""Where a worker keeps its images: the local folder (default) or an S3-compatible bucket.

Both stores answer the same calls, which is all the rest of the service uses:

    ensure()                            prepare at start-up (no network for S3)
    save(image, format, quality) -> name   encode and store; raises StorageError/StorageFull/StorageUnavailable
    url_for(name, base_url) -> str      the image_url of a response
    redirect_url(name) -> str | None    S3 only (remote = True): where GET /images/{name} sends the client
    path_for(name) -> Path | None       local only (remote = False): the file GET /images/{name} serves
    read_bytes(name) -> bytes | None    the stored bytes (b64_json answers)
    delete(name)                        never blocks the event loop
    sweep(max_age_s) -> int             retention (FLUX_IMAGE_TTL_S)
"""
from __future__ import annotations

from api.settings import Settings
from api.storage import LocalImageStore


def make_image_store(settings: Settings):
    if settings.storage_url.startswith("s3://"):
        from api.storage_s3 import S3ImageStore

        return S3ImageStore(settings.storage_url, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
                            addressing_style=settings.s3_addressing_style, url_ttl_s=settings.image_url_ttl_s,
                            public_base_url=settings.s3_public_base_url, timeout_s=settings.s3_timeout_s,
                            compress_level=settings.png_compress_level, name_prefix=settings.job_prefix)
    return LocalImageStore(settings.output_dir, settings.png_compress_level, name_prefix=settings.job_prefix)
