"""Fast lossless PNG encoding: numpy row filtering + ISA-L deflate (the `isal` package), Pillow as the fallback.

Why: the PNG encode is on every request's critical path. Pillow at zlib level 1 took ~107 ms per 1024² image
on the CI-class CPU (up to 356 ms when the cores are shared) against ~11 ms here, with files of the same size
or smaller (bench/encode.py, docs/BENCHMARKS.md). The output is a plain 8-bit RGB/RGBA/grey PNG: signature,
IHDR, one IDAT, IEND, every row with the "Up" filter (the byte above subtracted, modulo 256), which any PNG
decoder reverses exactly; so it is lossless like Pillow's. Images of other modes (palette, 16-bit, ...) and
installs without isal go through Pillow.
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np

try:
    from isal import isal_zlib
except ImportError:  # isal is in requirements.txt; a build without it still encodes, through Pillow
    isal_zlib = None

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOR_TYPE = {"L": 0, "RGB": 2, "RGBA": 6}  # mode -> PNG colour type, 8 bits per sample


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def fast_available(image) -> bool:
    return isal_zlib is not None and image.mode in COLOR_TYPE


def encode_fast(image, level: int = 1) -> bytes:
    """PNG bytes of an L/RGB/RGBA PIL image. `level` is ISA-L's (0-3; 1 compresses like zlib 1, faster)."""
    pixels = np.asarray(image, dtype=np.uint8)
    height, width = pixels.shape[:2]
    rows = pixels.reshape(height, -1)
    filtered = np.empty((height, rows.shape[1] + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # filter type Up
    filtered[0, 1:] = rows[0]  # the row above the first is zeros
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 arithmetic wraps modulo 256, as PNG wants
    header = struct.pack(">IIBBBBB", width, height, 8, COLOR_TYPE[image.mode], 0, 0, 0)
    data = isal_zlib.compress(filtered.tobytes(), max(0, min(3, level)))
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def encode_png(image, compress_level: int = 1) -> bytes:
    """Lossless PNG bytes. zlib levels 0-3 use the fast path (ISA-L at the same effort class); higher levels
    ask for the smallest file, which Pillow's zlib gives."""
    if compress_level <= 3 and fast_available(image):
        return encode_fast(image, compress_level)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()
