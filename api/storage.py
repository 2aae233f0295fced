"""ImageStore: server-made names, atomic writes, retention.

Names are the worker's id (its job prefix), "-", 32 hex digits and ".png", ".jpg" or ".webp", made here (the
prefix lets a proxy send GET /images/{name} to the worker that owns the image, on whichever host); a lookup
accepts nothing else, so no client string ever reaches the file system. What is served is only a regular file
under such a name, opened without following a symlink (O_NOFOLLOW, then fstat on the open file): a link or
folder planted in the output folder under a service-made name is "not found", and nothing outside the folder is
ever read. A file appears under its final name only once complete (temp file + rename in
the same folder), so a crash or a full disk never leaves half an image to serve.
"""
from __future__ import annotations

import errno
import io
import logging
import os
import re
import stat
import time
import uuid
from pathlib import Path

from api.errors import StorageError, StorageFull
from api.png import encode_png

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"^(?:[A-Za-z0-9_]{1,64}-)?[0-9a-f]{32}\.(png|jpg|webp)$")
SUFFIX = {"png": "png", "jpeg": "jpg", "webp": "webp"}
MEDIA_TYPE = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
DEFAULT_QUALITY = 90


class ImageStore:
    remote = False  # files served from this machine (S3ImageStore: remote, served by redirect)

    def __init__(self, root: str | os.PathLike, compress_level: int = 1, name_prefix: str = ""):
        self.root = Path(root).resolve()
        self.name_prefix = name_prefix
        # zlib level 1: several times faster than PIL's default 6 on real images, a little larger files;
        # the client waits for this encode, so it is on every request's critical path
        self.compress_level = compress_level

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def new_name(output_format: str = "png", name_prefix: str = "") -> str:
        name = f"{uuid.uuid4().hex}.{SUFFIX[output_format]}"
        return f"{name_prefix}-{name}" if name_prefix else name

    @staticmethod
    def media_type(name: str) -> str:
        return MEDIA_TYPE[name.rsplit(".", 1)[-1]]

    def url_for(self, name: str, base_url: str) -> str:
        return f"{base_url}/images/{name}"

    def read_bytes(self, name: str) -> bytes | None:
        path = self.path_for(name)
        try:
            return path.read_bytes() if path is not None else None
        except FileNotFoundError:  # swept between the lookup and the read
            return None

    def path_for(self, name: str) -> Path | None:
        """The path of a servable image (a regular file, not a link, under a service-made name), else None."""
        if not NAME_RE.fullmatch(name):
            return None
        path = self.root / name
        try:
            st = os.lstat(path)
        except OSError:
            return None
        return path if stat.S_ISREG(st.st_mode) else None

    def open_image(self, name: str) -> tuple[io.BufferedReader, int] | None:
        """An open image and its size, or None. The file checked is the file read: opened with O_NOFOLLOW (a
        symlink fails to open) and checked with fstat (a folder, fifo or device is refused, without blocking)."""
        if not NAME_RE.fullmatch(name):
            return None
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.root / name, flags)
        except OSError:  # missing, a symlink (ELOOP), unreadable
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                return None
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb"), st.st_size
        except OSError:
            os.close(fd)
            return None

    def save(self, image, output_format: str = "png", quality: int | None = None) -> str:
        """Encode a PIL image (png, jpeg or webp) and publish it atomically; returns its name. Runs off the GPU
        thread. On a 1024² image jpeg takes a few ms against ~100 ms for png at zlib level 1."""
        name = self.new_name(output_format, self.name_prefix)
        buf = io.BytesIO()
        if output_format == "png":
            buf.write(encode_png(image, self.compress_level))
        elif output_format == "jpeg":
            image.convert("RGB").save(buf, format="JPEG", quality=quality or DEFAULT_QUALITY)
        elif output_format == "webp":
            # method 0: the fastest encoder effort, measured half the time of Pillow's default 4 at 1024²
            image.save(buf, format="WEBP", quality=quality or DEFAULT_QUALITY, method=0)
        else:
            raise ValueError(f"unknown output format {output_format!r}")
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


LocalImageStore = ImageStore  # the default store; api/storage_s3.py has the S3 one
