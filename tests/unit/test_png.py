"""The fast PNG encoder: lossless for every mode it takes, a valid file for any decoder, Pillow otherwise."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import api.png
from api.png import encode_png
from api.storage import ImageStore


def random_image(mode: str, width: int = 97, height: int = 61, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode)


def decode(data: bytes) -> Image.Image:
    Image.open(io.BytesIO(data)).verify()  # checks the chunk CRCs too
    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
@pytest.mark.parametrize("level", [0, 1, 3])
def test_fast_png_round_trips_every_pixel(mode, level):
    image = random_image(mode, seed=level)
    data = encode_png(image, level)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    back = decode(data)
    assert back.mode == mode and back.size == image.size
    assert np.array_equal(np.asarray(back), np.asarray(image))


def test_fast_png_is_used_and_compresses_a_smooth_image():
    x = np.arange(512, dtype=np.uint16)
    gradient = np.stack(np.broadcast_arrays((x[None, :] // 2) % 256, (x[:, None] // 2) % 256,
                                            ((x[None, :] + x[:, None]) // 4) % 256), -1).astype(np.uint8)
    image = Image.fromarray(gradient, "RGB")
    data = encode_png(image, 1)
    assert data == api.png.encode_fast(image, 1)  # the fast path, not Pillow
    assert len(data) < gradient.nbytes / 20
    assert np.array_equal(np.asarray(decode(data)), gradient)


def test_other_modes_high_levels_and_a_missing_isal_go_through_pillow(monkeypatch):
    palette = random_image("RGB").convert("P")
    assert np.array_equal(np.asarray(decode(encode_png(palette, 1))), np.asarray(palette))
    image = random_image("RGB", seed=3)
    smallest = encode_png(image, 9)
    assert smallest != api.png.encode_fast(image, 1)
    assert np.array_equal(np.asarray(decode(smallest)), np.asarray(image))
    monkeypatch.setattr(api.png, "isal_zlib", None)
    assert np.array_equal(np.asarray(decode(encode_png(image, 1))), np.asarray(image))


def test_the_store_writes_pngs_with_the_fast_encoder(tmp_path):
    store = ImageStore(tmp_path, compress_level=1)
    store.ensure()
    image = random_image("RGB", 128, 64)
    name = store.save(image, "png")
    data = (tmp_path / name).read_bytes()
    assert data == api.png.encode_fast(image, 1)
    assert np.array_equal(np.asarray(decode(data)), np.asarray(image))
