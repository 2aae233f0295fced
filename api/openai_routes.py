"""OpenAI-compatible image generation: POST /v1/images/generations.

Accepts the fields the official clients send (`prompt`, `model`, `n`, `size` "WxH", `response_format`
url|b64_json, `quality`, `style`, `user`, `output_format` png|jpeg|webp, `output_compression` 0-100) plus the
`seed` extension, and answers in OpenAI's shape, so
`OpenAI(base_url="http://host/v1").images.generate(...)` works unchanged against a worker or the proxy.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.errors import InvalidRequest, StorageError
from api.inputs import prepare_inputs
from api.http import make_spec, output_options, parse_generate, parse_model, read_json_object
from api.runtime import get_service
from api.schemas import OutputFormat
from api.service import ImageService

MAX_N = 4


class OpenAIImageRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N, strict=True)
    size: str | None = "1024x1024"
    response_format: Literal["url", "b64_json"] | None = "url"
    seed: int | None = Field(None, strict=True)
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    output_format: OutputFormat | None = None
    output_compression: int | None = Field(None, ge=0, le=100, strict=True)
    loras: list | None = None  # extension: checked as the native field (api/schemas.py LoraRef)

    @field_validator("size")
    @classmethod
    def _size_shape(cls, value: str | None) -> str | None:
        if value is None or value == "auto":
            return None
        w, sep, h = value.lower().partition("x")
        if not sep or not _side_digits(w) or not _side_digits(h):
            raise ValueError('must look like "1024x1024"')
        return value


def _side_digits(text: str) -> bool:
    # str.isdigit() alone takes "²" and 5000-digit strings, on which int() raises (an unhandled 500)
    return text.isascii() and text.isdigit() and len(text) <= 6


# Fields of /generate that this route does not take. Unknown fields are ignored (OpenAI's clients send new ones),
# but one of these is a request for something this route would silently not do (an image-to-image request
# answered with a text-to-image, steps that are not taken), so it is refused, naming the route that takes it.
NATIVE_ONLY = {"width": 'use "size": "WxH"', "height": 'use "size": "WxH"'} | dict.fromkeys(
    ("image", "mask", "strength", "num_inference_steps", "guidance_scale", "timeout_s", "output_quality"),
    "send it to /generate or /jobs, which take it")

router = APIRouter()


@router.post("/v1/images/generations")
async def images_generations(request: Request, service: ImageService = Depends(get_service)):
    rt = service.rt
    data = await read_json_object(request, rt.settings.max_body_bytes)
    for name, hint in NATIVE_ONLY.items():
        if name in data:
            raise InvalidRequest(f"{name}: not a field of /v1/images/generations; {hint}", field=name)
    oa = parse_model(OpenAIImageRequest, data)
    width, height = (int(v) for v in (oa.size or "1024x1024").lower().split("x"))
    native = {"prompt": oa.prompt, "width": width, "height": height}
    if oa.seed is not None:
        native["seed"] = oa.seed
    if oa.output_format is not None:
        native["output_format"] = oa.output_format
    if oa.output_compression is not None:  # OpenAI's compression percentage; ours is a quality
        native["output_quality"] = max(1, 100 - oa.output_compression)
    if oa.loras is not None:
        native["loras"] = oa.loras
    try:
        req = parse_generate(native, rt.settings.max_prompt_chars)
        output = output_options(req, rt.settings)
    except InvalidRequest as exc:  # name the OpenAI field, not ours
        field = {"width": "size", "height": "size", "output_quality": "output_compression"}.get(exc.field, exc.field)
        raise InvalidRequest(exc.message.replace(f"{exc.field}:", f"{field}:", 1), field=field) from None

    inputs = await prepare_inputs(req, rt)  # adapters checked, images decoded: once for all n

    def specs():
        first = make_spec(req, rt.info, inputs)
        if oa.seed is None:
            return [first] + [make_spec(req, rt.info, inputs) for _ in range(oa.n - 1)]
        return [dataclasses.replace(first, seed=(oa.seed + i) % 2**32) for i in range(oa.n)]

    jobs, _ = service.admit(request, "/v1/images/generations", data, specs, output)  # all n images or none
    await service.wait(request, jobs)
    out = []
    for job in jobs:
        if oa.response_format == "b64_json":
            raw = await asyncio.to_thread(rt.store.read_bytes, job.image_name)
            if raw is None:  # deleted between its upload and this read (retention, an operator)
                raise StorageError("the image was stored but is gone; try again")
            out.append({"b64_json": base64.b64encode(raw).decode(), "revised_prompt": oa.prompt})
        else:
            out.append({"url": service.result(request, job)["image_url"], "revised_prompt": oa.prompt})
    return {"created": int(time.time()), "data": out}
