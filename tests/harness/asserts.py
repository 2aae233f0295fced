"""Response checks shared by every test layer: the JSON error shape, no leaked internals, PNG bytes."""
from __future__ import annotations

import io
import re

from PIL import Image

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A response that shows any of these leaks internals: a traceback, a source file, a file-system path.
LEAK_RE = re.compile(r"Traceback|File \"|site-packages|\w\.py\b|/work/|/home/|/tmp/|/usr/|/var/|\bline \d+, in\b")


def assert_no_leak(text: str) -> None:
    match = LEAK_RE.search(text)
    assert match is None, f"response leaks internals ({match.group(0)!r}): {text[:800]}"


def assert_error(resp, status: int | tuple[int, ...], code: str | None = None, field: str | None = None) -> dict:
    """A JSON error body {"error": {"code", "message", ...}} with the expected status (one or any of several),
    code and field where given, leaking nothing. Returns the error object."""
    statuses = (status,) if isinstance(status, int) else tuple(status)
    assert resp.status_code in statuses, f"expected {statuses}, got {resp.status_code}: {resp.text[:500]}"
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    body = resp.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    error = body["error"]
    assert isinstance(error.get("code"), str) and error["code"], error
    assert isinstance(error.get("message"), str) and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    if field is not None:
        assert error.get("field") == field, error
    assert_no_leak(resp.text)
    return error


def assert_png(data: bytes, width: int | None = None, height: int | None = None) -> Image.Image:
    """PNG bytes that decode completely (of width x height where given); returns the image."""
    assert data[:8] == PNG_MAGIC, data[:16]
    image = Image.open(io.BytesIO(data))
    image.load()
    if width is not None:
        assert image.size == (width, height if height is not None else width), image.size
    return image
