"""GET /images/{name}: a stored image, with the headers nginx sends for the same file.

The file is opened once (api/storage.py ImageStore.open_image: service-made name, regular file, no symlink) and
that open file is what is sent, so nothing can be swapped in between the check and the read. Images never
change under a name, so caches may keep them for their whole retention period (FLUX_IMAGE_TTL_S, default a day).
"""
from __future__ import annotations

import anyio
from starlette.responses import Response

from api.errors import NotFound

# The same on both layers (the nginx config's /images/ location sends these too).
IMAGE_HEADERS = {"Cache-Control": "public, max-age=86400, immutable", "X-Content-Type-Options": "nosniff"}
CHUNK = 256 * 1024


class OpenFileResponse(Response):
    """Sends an already open file (closed when the response ends, sent or not)."""

    def __init__(self, fh, size: int, media_type: str, headers: dict[str, str]):
        self.fh, self.size = fh, size
        super().__init__(None, 200, {**headers, "Content-Length": str(size)}, media_type)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            if scope.get("method") == "HEAD":
                await send({"type": "http.response.body", "body": b""})
                return
            remaining = self.size
            while True:
                chunk = await anyio.to_thread.run_sync(self.fh.read, min(CHUNK, remaining)) if remaining else b""
                remaining -= len(chunk)
                more = bool(chunk) and remaining > 0
                await send({"type": "http.response.body", "body": chunk, "more_body": more})
                if not more:
                    return
        finally:
            self.fh.close()


def image_response(store, name: str) -> Response:
    opened = store.open_image(name)
    if opened is None:
        raise NotFound("no such image", field="name")
    fh, size = opened
    return OpenFileResponse(fh, size, store.media_type(name), IMAGE_HEADERS)
