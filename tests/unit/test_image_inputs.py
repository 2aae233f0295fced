"""Image-to-image and inpainting on the real dummy:tiny pipeline, and every refusal of an input image."""
from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from api.app import create_app
from tests.unit.support import SMALL, PreloadedEngine, make_settings, png_image, serve

pytestmark = pytest.mark.anyio  # the sync tests below are plain functions


def encoded(image: Image.Image, fmt: str = "PNG", **save) -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return base64.b64encode(buf.getvalue()).decode()


def picture(width=256, height=256) -> Image.Image:
    """A structured picture (stripes and a disc) that the tiny model's noise would not reproduce by chance."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    rgb = np.stack([(x * 4) % 256, (y * 2) % 256, ((x - width / 2) ** 2 + (y - height / 2) ** 2 < 60 ** 2) * 255],
                   axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def roundtrip(engine, image: Image.Image, seed: int) -> Image.Image:
    """The input as the pipeline can keep it: through the VAE and back, with the latent sample the pipeline draws
    (FluxImg2ImgPipeline samples the encoder's distribution with the request's generator, first draw).
    dummy:tiny's random VAE has an encoder variance near 1, so the pixels sent are not what it can keep."""
    import torch

    pipe = engine.pipe
    with torch.inference_mode():
        x = pipe.image_processor.preprocess(image, height=image.height, width=image.width).to(pipe.vae.dtype)
        dist = pipe.vae.encode(x).latent_dist
        noise = torch.randn(dist.mean.shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=dist.mean.dtype)
        latents = dist.mean + dist.std * noise
        return pipe.image_processor.postprocess(pipe.vae.decode(latents).sample, output_type="pil")[0]


def distance(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=int) - np.asarray(b.resize(a.size), dtype=int)).mean())


@pytest.fixture
def app_for(bf16_engine, tmp_path):
    def build(**settings):
        engine = PreloadedEngine(bf16_engine)
        return serve(create_app(make_settings(tmp_path, **settings), engine)), engine

    return build


async def fetch(http, response) -> Image.Image:
    assert response.status_code == 200, response.text
    return png_image((await http.get(response.json()["image_url"])).content)


async def test_img2img_keeps_the_input_at_low_strength_and_redraws_it_at_full(app_for, bf16_engine):
    src = picture()
    server, engine = app_for()
    async with server as http:
        low = await fetch(http, await http.post("/generate", json=dict(SMALL, image=encoded(src), strength=0.05,
                                                                         num_inference_steps=20)))
        full = await fetch(http, await http.post("/generate", json=dict(SMALL, image=encoded(src), strength=1.0,
                                                                          num_inference_steps=4)))
        text = await fetch(http, await http.post("/generate", json=SMALL))
    assert engine.batches[0][0].mode == "img2img" and engine.batches[0][0].strength == 0.05
    kept = roundtrip(bf16_engine, src, SMALL["seed"])
    # measured: 4.9 at strength 0.05; 14.9 at strength 1; 9.2 for text-to-image (the random VAE's grey)
    assert distance(low, kept) < 8, distance(low, kept)
    assert distance(low, kept) < distance(full, kept) / 2 and distance(low, kept) < 0.75 * distance(text, kept)
    assert engine._derived_pipes["img2img"].transformer is bf16_engine.pipe.transformer  # no second copy
    assert engine._derived_pipes["img2img"].vae is bf16_engine.pipe.vae


async def test_every_form_of_image_is_accepted(app_for):
    src = picture(300, 200)
    server, engine = app_for()
    async with server as http:
        first = await http.post("/generate", json=SMALL)
        name = first.json()["image_url"].rsplit("/", 1)[1]
        forms = {
            "png": encoded(src),
            "jpeg": encoded(src, "JPEG", quality=90),
            "webp": encoded(src, "WEBP"),
            "data-url": "data:image/png;base64," + encoded(src),
            "wrapped": "\n".join(encoded(src)[i:i + 76] for i in range(0, len(encoded(src)), 76)),
            "spaced": " " + " ".join(encoded(src)[i:i + 64] for i in range(0, len(encoded(src)), 64)) + "\t\n",
            "url-safe": base64.urlsafe_b64encode(base64.b64decode(encoded(src))).decode(),
            "name": name,
        }
        for form, value in forms.items():
            response = await http.post("/generate", json={"prompt": "a boat", "image": value, "strength": 0.5,
                                                          "num_inference_steps": 2, "seed": 1})
            image = await fetch(http, response)
            expected = (256, 256) if form == "name" else (384, 256)  # its own shape, sides of 256 to 2048 in 16s
            assert image.size == expected, form
        sized = await fetch(http, await http.post("/generate", json=dict(SMALL, width=320, image=encoded(src))))
        assert sized.size == (320, 256)


async def test_inpainting_redraws_the_masked_part(app_for, bf16_engine):
    src = picture()
    mask = Image.new("L", src.size, 0)
    mask.paste(255, (0, 0, 128, 256))  # re-draw the left half only
    server, engine = app_for()
    async with server as http:
        out = await fetch(http, await http.post("/generate", json=dict(
            SMALL, image=encoded(src), mask=encoded(mask), strength=1.0)))
        oa = await http.post("/v1/images/generations", json={"prompt": "x", "size": "256x256"})
        assert oa.status_code == 200
    assert engine.batches[0][0].mode == "inpaint"
    kept = roundtrip(bf16_engine, src, SMALL["seed"])
    left = distance(out.crop((0, 0, 128, 256)), kept.crop((0, 0, 128, 256)))
    right = distance(out.crop((128, 0, 256, 256)), kept.crop((128, 0, 256, 256)))
    assert right < left / 2, (left, right)
    assert engine._derived_pipes["inpaint"].transformer is bf16_engine.pipe.transformer


async def test_only_compatible_requests_share_a_batch(app_for):
    import asyncio

    server, engine = app_for(max_concurrent=4, batch_wait_ms=300)
    src = encoded(picture())
    async with server as http:
        bodies = [SMALL, dict(SMALL, seed=8), dict(SMALL, image=src, strength=0.5), dict(SMALL, image=src, strength=0.5,
                  seed=9), dict(SMALL, image=src, strength=0.6)]
        responses = await asyncio.gather(*(http.post("/generate", json=b) for b in bodies))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    for batch in engine.batches:
        assert len({s.batch_key for s in batch}) == 1
    assert sorted(len(b) for b in engine.batches) == [1, 2, 2]


def _bomb() -> str:
    buf = io.BytesIO()
    Image.new("1", (6000, 6000)).save(buf, format="PNG", optimize=True)  # 36 MP from a few KB
    return base64.b64encode(buf.getvalue()).decode()


def _huge_header() -> str:
    """A PNG header claiming 100000x100000 (over Pillow's own bomb limit, which refuses it at open)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))
    return base64.b64encode(raw).decode()


def _huge_text_chunk() -> str:
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "A" * (8 << 20), zip=True)  # a few KB that inflate past Pillow's chunk limit
    return encoded(picture(64, 64), pnginfo=info)


def _truncated() -> str:
    raw = base64.b64decode(encoded(picture(64, 64)))
    return base64.b64encode(raw[: len(raw) // 2]).decode()


def _gif() -> str:
    return encoded(picture(64, 64), "GIF")


BAD = [
    ({"image": "not base64!!"}, 422, "image", "base64"),
    ({"image": "/etc/passwd"}, 422, "image", "base64"),
    ({"image": "../images/x.png"}, 422, "image", "base64"),
    ({"image": "http://169.254.169.254/latest"}, 422, "image", "URLs are not fetched"),
    ({"image": "https://example.com/cat.png"}, 422, "image", "URLs are not fetched"),
    ({"image": "file:///etc/passwd"}, 422, "image", "URLs are not fetched"),
    ({"image": "data:image/png,abc"}, 422, "image", "base64"),
    ({"image": base64.b64encode(b"hello, this is text").decode()}, 422, "image", "not a PNG"),
    ({"image": "__gif__"}, 422, "image", "not a PNG"),
    ({"image": "__truncated__"}, 422, "image", "truncated"),
    ({"image": "__bomb__"}, 422, "image", "pixels"),
    ({"image": "__huge_header__"}, 422, "image", "larger than 4,000,000 pixels"),
    ({"image": "__huge_text_chunk__"}, 422, "image", "metadata too large"),
    ({"image": ""}, 422, "image", "empty"),
    ({"image": 5}, 422, "image", "string"),
    ({"image": "__png__", "strength": 0}, 422, "strength", "greater than 0"),
    ({"image": "__png__", "strength": 1.5}, 422, "strength", "less than or equal to 1"),
    ({"strength": 0.5}, 422, "strength", "send an image"),
    ({"mask": "__png__"}, 422, "mask", "needs an image"),
    ({"image": "__png__", "mask": "__small_mask__"}, 422, "mask", "must match"),
    ({"image": "__png__", "mask": "nope"}, 422, "mask", "not a PNG"),
    ({"image": "__png__", "mask": "no!"}, 422, "mask", "base64"),
    ({"image": "__big__"}, 413, "image", "at most 20000 bytes"),
]


async def test_every_bad_image_is_a_4xx_naming_the_field(app_for):
    png = encoded(picture(64, 64))
    values = {"__png__": png, "__bomb__": _bomb(), "__truncated__": _truncated(), "__gif__": _gif(),
              "__huge_header__": _huge_header(), "__huge_text_chunk__": _huge_text_chunk(),
              "__small_mask__": encoded(Image.new("L", (32, 32), 255)),
              "__big__": base64.b64encode(np.random.default_rng(0).bytes(30_000)).decode()}
    server, engine = app_for(max_image_bytes=20_000)
    async with server as http:
        for fields, status, field, words in BAD:
            body = dict(SMALL, **{k: values.get(v, v) if isinstance(v, str) else v for k, v in fields.items()})
            response = await http.post("/generate", json=body)
            assert response.status_code == status, (fields, response.text)
            error = response.json()["error"]
            assert error["field"] == field and words in error["message"], (fields, error)
        assert (await http.get("/health")).status_code == 200
    assert engine.batches == []


async def test_the_body_limit_grows_with_the_image_limit(app_for):
    noisy = Image.fromarray(np.random.default_rng(1).integers(0, 255, (512, 512, 3), dtype=np.uint8))
    big = encoded(noisy)  # ~1 MB of base64: over FLUX_MAX_BODY_BYTES, under the image allowance
    assert len(big) > 65536
    server, _ = app_for()
    async with server as http:
        response = await http.post("/generate", json=dict(SMALL, image=big, strength=0.5))
        assert response.status_code == 200, response.text
        too_big = await http.post("/generate", json=dict(SMALL, image=big + "A" * 30_000_000))
        assert too_big.status_code == 413 and too_big.json()["error"]["field"] == "body"
        # the allowance is for images only: any other body keeps FLUX_MAX_BODY_BYTES
        padded = await http.post("/generate", json=dict(SMALL, prompt="x" * 70_000))
        assert padded.status_code == 413 and padded.json()["error"]["field"] == "body"
        oa = await http.post("/v1/images/generations", json={"prompt": "x", "image": big})
        assert oa.status_code == 413


@pytest.mark.parametrize("size", [(1, 1), (255, 257), (300, 200), (2048, 2048), (4000, 100), (100, 4000),
                                  (2049, 1953), (1000, 1000), (7000, 20)])
def test_an_images_own_size_becomes_a_servable_one(size):
    from api.inputs import fit_size
    from api.schemas import MAX_PIXELS, MAX_SIDE, MIN_SIDE

    w, h = fit_size(*size)
    assert MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE and w % 16 == 0 and h % 16 == 0
    assert w * h <= MAX_PIXELS
    if size == (300, 200):
        assert (w, h) == (384, 256)
    if size == (1000, 1000):
        assert (w, h) == (1008, 1008)


async def test_the_openai_route_refuses_the_native_fields_it_would_ignore(app_for):
    """An image (or steps, a width) sent to /v1/images/generations was dropped: a text-to-image came back."""
    server, engine = app_for()
    async with server as http:
        for extra, field in (({"image": encoded(picture(64, 64)), "n": 2}, "image"), ({"strength": 0.5}, "strength"),
                             ({"width": 512}, "width"), ({"num_inference_steps": 1}, "num_inference_steps")):
            response = await http.post("/v1/images/generations", json=dict({"prompt": "x", "size": "256x256"}, **extra))
            assert response.status_code == 422, (extra, response.text)
            assert response.json()["error"]["field"] == field
        ignored = await http.post("/v1/images/generations", json={"prompt": "x", "size": "256x256", "background": "auto"})
        assert ignored.status_code == 200, ignored.text  # an OpenAI field this service has no use for
    assert len(engine.batches) == 1
