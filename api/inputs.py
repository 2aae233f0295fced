"""Input images of a request (image-to-image, inpainting): decoding and checking, off the event loop.

An image is sent inline (base64, or a data URL) or named (an image this worker generated, looked up in the
image store by its exact name: never a path). The server never fetches a URL. Before Pillow decodes a single
pixel, the file size and the header's dimensions are checked against the limits, so a decompression bomb costs
a header parse; decoding itself runs in a thread, at most two at a time.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import warnings
import weakref

from PIL import Image, ImageOps, UnidentifiedImageError

from api.errors import InvalidRequest, PayloadTooLarge
from api.storage import NAME_RE
from api.schemas import MAX_PIXELS, MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE, GenerateRequest

FORMATS = ("PNG", "JPEG", "WEBP")
DEFAULT_STRENGTH = 0.8
_URL_RE = re.compile(r"^\s*([a-z][a-z0-9+.-]*://|//|file:)", re.IGNORECASE)
_DATA_URL_RE = re.compile(r"^data:([a-z0-9.+/-]*)(;[a-z0-9=.+-]*)*?(;base64)?,", re.IGNORECASE)
_B64_CLEAN = str.maketrans({"-": "+", "_": "/", " ": None, "\t": None, "\n": None, "\r": None, "\f": None,
                            "\v": None})
_decoders: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]" = weakref.WeakKeyDictionary()


def _decode_slots() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    sem = _decoders.get(loop)
    if sem is None:
        sem = _decoders[loop] = asyncio.Semaphore(2)
    return sem


def image_bytes(value: str, field: str, store, max_bytes: int) -> bytes:
    """The file bytes behind an `image`/`mask` value, or a 4xx naming the field."""
    if _URL_RE.match(value):
        raise InvalidRequest(f"{field}: URLs are not fetched; send the image as base64, a data URL, or the name of "
                             "an image this service generated", field=field)
    if NAME_RE.fullmatch(value):
        # read_bytes, the call both stores answer (a local file or the bucket's object), and only for a name the
        # service makes: path_for is the local store's alone, and the S3 store has none (a 500 for every name)
        raw = store.read_bytes(value)
        if raw is None:
            raise InvalidRequest(f"{field}: no image named {value!r} (unknown, or expired)", field=field)
        if len(raw) > max_bytes:
            raise PayloadTooLarge(f"{field}: the image file must be at most {max_bytes} bytes", field=field)
        return raw
    payload = value
    match = _DATA_URL_RE.match(value)
    if match:
        if not match.group(3):
            raise InvalidRequest(f"{field}: a data URL must be base64 (data:image/png;base64,...)", field=field)
        payload = value[match.end():]
    # base64 as the clients at hand write it: wrapped lines or spaces (MIME, PEM), the URL-safe alphabet (its
    # '-' and '_' are not in the standard one, so nothing is ambiguous). Padding stays required: without it a
    # path like "/etc/passwd" would decode to bytes and be answered "not a PNG" instead of "not base64".
    payload = payload.translate(_B64_CLEAN)
    if len(payload) > 4 * -(-max_bytes // 3) + 4:
        raise PayloadTooLarge(f"{field}: the image file must be at most {max_bytes} bytes", field=field)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{field}: not valid base64 (nor the name of an image of this service)",
                             field=field) from None
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"{field}: the image file must be at most {max_bytes} bytes", field=field)
    if not raw:
        raise InvalidRequest(f"{field}: the image is empty", field=field)
    return raw


def open_image(raw: bytes, field: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode PNG/JPEG/WebP bytes, refusing anything over max_pixels before decoding (header only)."""
    try:
        im = Image.open(io.BytesIO(raw), formats=FORMATS)
    except Image.DecompressionBombError:  # Pillow's own limit (far above ours) refused the header's size
        raise InvalidRequest(f"{field}: the image is larger than {max_pixels:,} pixels", field=field) from None
    except UnidentifiedImageError:
        raise InvalidRequest(f"{field}: not a PNG, JPEG or WebP image", field=field) from None
    except (OSError, ValueError, SyntaxError):  # a known format whose header or metadata chunks Pillow refused
        raise InvalidRequest(f"{field}: the image header is corrupt or its metadata too large",
                             field=field) from None
    width, height = im.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise InvalidRequest(f"{field}: the image is {width}x{height}; at most {max_pixels:,} pixels", field=field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
            im = ImageOps.exif_transpose(im)
    except Exception:  # truncated data, a bad chunk, a decoder error: the client's file, not our failure
        raise InvalidRequest(f"{field}: the image is truncated or corrupt", field=field) from None
    return im


def fit_size(width: int, height: int) -> tuple[int, int]:
    """An image's own size made servable: within the side and pixel limits, aspect kept, multiples of 16."""
    # up to the smallest side served, then down to the largest side and pixel count (which win for extreme shapes)
    scale = max(1.0, MIN_SIDE / min(width, height))
    scale = min(scale, MAX_SIDE / max(width, height), (MAX_PIXELS / (width * height)) ** 0.5)
    w, h = width * scale, height * scale

    def side(v: float) -> int:
        return int(min(MAX_SIDE, max(MIN_SIDE, int(v / SIDE_MULTIPLE + 0.5) * SIDE_MULTIPLE)))  # ties up

    w16, h16 = side(w), side(h)
    while w16 * h16 > MAX_PIXELS:  # rounding up may cross the limit by a row
        if w16 >= h16:
            w16 -= SIDE_MULTIPLE
        else:
            h16 -= SIDE_MULTIPLE
    return w16, h16


def decode_inputs(req: GenerateRequest, store, max_bytes: int) -> dict:
    """Runs in a thread: the image (RGB) and mask (L) at the output size, and the size, mode and strength."""
    image = open_image(image_bytes(req.image, "image", store, max_bytes), "image")
    mask = None
    if req.mask is not None:
        mask = open_image(image_bytes(req.mask, "mask", store, max_bytes), "mask")
        if mask.size != image.size:
            raise InvalidRequest(f"mask: the mask is {mask.size[0]}x{mask.size[1]} but the image is "
                                 f"{image.size[0]}x{image.size[1]}; they must match", field="mask")
    explicit = {"width", "height"} & req.model_fields_set
    width, height = (req.width, req.height) if explicit else fit_size(*image.size)
    out = {"width": width, "height": height, "mode": "inpaint" if mask is not None else "img2img",
           "strength": req.strength if req.strength is not None else DEFAULT_STRENGTH}
    for field, im, mode, resample in (("image", image, "RGB", Image.LANCZOS), ("mask", mask, "L", Image.BILINEAR)):
        if im is None:
            continue
        try:
            out[field] = im.convert(mode).resize((width, height), resample)
        except Exception:  # an exotic mode Pillow cannot convert: still the client's file
            raise InvalidRequest(f"{field}: the image cannot be converted to {mode}", field=field) from None
    return out


async def prepare_inputs(req: GenerateRequest, rt) -> dict:
    """Everything of a request that needs I/O or CPU before it can be queued: adapters checked against their
    files, input images decoded. The result goes to make_spec."""
    out: dict = {"loras": await rt.loras.check(req.loras)}
    if req.image is None:
        if req.mask is not None:
            raise InvalidRequest("mask: a mask needs an image", field="mask")
        if req.strength is not None:
            raise InvalidRequest("strength: applies to image-to-image and inpainting (send an image)",
                                 field="strength")
        return out
    async with _decode_slots():
        out.update(await asyncio.to_thread(decode_inputs, req, rt.store, rt.settings.max_image_bytes))
    return out
