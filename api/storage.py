"""ImageStore: server-made names, atomic writes, retention.

Names are 32 hex digits + ".png", made here; a lookup accepts nothing else, so no client string ever
reaches the file system. A file appears under its final name only once complete (temp file + rename in
the same folder), so a crash or a full disk never leaves half an image to serve.
"""
from __future__ import annotations

import errno
import io
import logging
import os
import re
import time
import uuid
from pathlib import Path

from api.errors import StorageError, StorageFull

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"^[0-9a-f]{32}\.png$")


class ImageStore:
    def __init__(self, root: str | os.PathLike, compress_level: int = 1):
        self.root = Path(root).resolve()
        # zlib level 1: several times faster than PIL's default 6 on real images, a little larger files;
        # the client waits for this encode, so it is on every request's critical path
        self.compress_level = compress_level

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def new_name() -> str:
        return f"{uuid.uuid4().hex}.png"

    def path_for(self, name: str) -> Path | None:
        if not NAME_RE.fullmatch(name):
            return None
        path = self.root / name
        return path if path.is_file() else None

    def save(self, image, name: str | None = None) -> str:
        """Encode a PIL image as PNG and publish it atomically; returns its name. Runs off the GPU thread."""
        name = name or self.new_name()
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=self.compress_level)
        self.write_bytes(name, buf.getvalue())
        return name

    def write_bytes(self, name: str, data: bytes) -> None:
        tmp = self.root / f".tmp-{name}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.root / name)
        except OSError as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            log.error("cannot write image %s: %s", name, exc)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull("the image store is full; try again later") from None
            raise StorageError("the image could not be stored; try again later") from None

    def delete(self, name: str) -> None:
        if NAME_RE.fullmatch(name):
            (self.root / name).unlink(missing_ok=True)

    def sweep(self, max_age_s: float, now: float | None = None) -> int:
        """Delete images (and stale temp files) older than max_age_s; returns how many went."""
        now = time.time() if now is None else now
        removed = 0
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return 0
        for entry in entries:
            is_ours = NAME_RE.fullmatch(entry.name) or entry.name.startswith(".tmp-")
            try:
                if is_ours and now - entry.stat().st_mtime > max_age_s:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue
        return removed
