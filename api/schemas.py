"""Request and response bodies with their bounds."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 256, 2048, 16
MAX_PIXELS = 4_000_000  # 4 megapixels: 2048x1952 passes, 2048x2048 does not
MAX_SEED = 2**32 - 1
MAX_STEPS = 100
MAX_GUIDANCE = 30.0
OutputFormat = Literal["png", "jpeg", "webp"]


MAX_LORA_SCALE = 2.0
MAX_LORAS_FIELD = 16  # a hard bound on the list; the worker's own limit (FLUX_MAX_LORAS_PER_REQUEST) is lower


# Floats carry allow_inf_nan=False: NaN (which JSON parsers accept) failed a bound first, with a message about
# the bound ("less than or equal to 2"); the finite check runs before the bounds and names the defect.


class LoraRef(BaseModel):
    """One adapter of a request: a file name in the worker's FLUX_LORA_DIR (without .safetensors) and its scale."""

    model_config = ConfigDict(strict=True, extra="forbid")

    name: str = Field(max_length=64)
    scale: float = Field(1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, allow_inf_nan=False)

    @field_validator("scale")
    @classmethod
    def _finite_scale(cls, value: float) -> float:
        if value != value:
            raise ValueError("must be a finite number")
        return value


class GenerateRequest(BaseModel):
    """POST /generate and POST /jobs. Strict types: "512" is not a width, true is not a seed."""

    model_config = ConfigDict(strict=True, extra="forbid")

    prompt: str
    width: int = Field(1024, ge=MIN_SIDE, le=MAX_SIDE)
    height: int = Field(1024, ge=MIN_SIDE, le=MAX_SIDE)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)
    timeout_s: float | None = Field(None, gt=0, le=3600, allow_inf_nan=False,
                                     description="deadline for this request, queue included")
    output_format: OutputFormat | None = Field(None, description="png (lossless), jpeg or webp; default: the "
                                               "worker's FLUX_OUTPUT_FORMAT")
    output_quality: int | None = Field(None, ge=1, le=100, description="jpeg/webp quality; default: the worker's")
    loras: list[LoraRef] | None = Field(None, max_length=MAX_LORAS_FIELD, description="LoRA adapters to apply")
    image: str | None = Field(None, description="input image: base64 PNG/JPEG/WebP, a data URL, or the name of an "
                              "image this service generated; turns the request into image-to-image")
    mask: str | None = Field(None, description="inpainting mask (same forms as image): white is re-drawn")
    strength: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False,
                                    description="share of the input image re-drawn; default 0.8")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be empty")
        if "\x00" in value:
            raise ValueError("prompt must not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800") would fail in the tokenizer, as a GPU failure
            raise ValueError("prompt must be valid Unicode text (no lone surrogates)") from None
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_16(cls, value: int) -> int:
        if value % SIDE_MULTIPLE:
            raise ValueError(f"must be a multiple of {SIDE_MULTIPLE}")
        return value

    @field_validator("guidance_scale", "timeout_s", "strength")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and value != value:
            raise ValueError("must be a finite number")
        return value



class GenerateResponse(BaseModel):
    image_url: str
    seed: int
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    model: str
    synthetic: bool
    precision: str
    gpu: int | None
    queue_ms: float
    generate_ms: float | None
    request_id: str
    job_id: str
    output_format: str
