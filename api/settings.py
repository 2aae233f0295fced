"""Every knob of a worker, read once at start-up from the environment (prefix FLUX_).

Nothing else in the service reads os.environ: the Settings object is built by the entry point and passed
down. The port is the one exception to the prefix, as the user guide names it per precision:
FP4_API_PORT / BF16_API_PORT / FP8_API_PORT (FLUX_PORT is accepted for any precision).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from api.schemas import OutputFormat

Precision = Literal["bf16", "fp4", "fp8"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLUX_", extra="ignore", populate_by_name=True)

    # model and device
    model: str = Field("black-forest-labs/FLUX.1-schnell", description="hub id, local folder, or dummy:tiny / "
                       "dummy:flux.1-dev / dummy:flux.1-schnell")
    precision: Precision = "bf16"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    gpu_index: int | None = Field(None, description="physical GPU number shown in responses; default: the first "
                                  "entry of CUDA_VISIBLE_DEVICES")
    compile: bool = Field(True, description="torch.compile the repeated transformer blocks (GPU only; lossless, "
                          "measured 25-30% faster on H100)")
    compile_cache_dir: str = Field(str(Path.home() / ".cache" / "flux-api" / "inductor"),
                                   description="persistent inductor cache, so restarts skip compiling")
    warmup_sizes: str = Field("auto", description="comma-separated WxH sizes rendered (and compiled) before /health "
                              "is ready; auto: 1024x1024,512x512 on a GPU, 512x512 on a CPU")
    warmup_steps: int = 2
    fp4_quant_type: Literal["fp4", "nf4"] = "fp4"
    fuse_qkv: bool = Field(False, description="fuse q/k/v projections (bf16/fp8); lossless, no measured gain")
    attention_backend: str = Field("native", description="diffusers attention backend of the transformer (GPU "
                                   "only): native (PyTorch SDPA's own choice), _native_cudnn, _native_flash, ...")
    compile_mode: str = Field("", description="torch.compile mode of the blocks, e.g. max-autotune-no-cudagraphs; "
                              "empty: the default mode")
    prompt_cache_size: int = Field(64, ge=0, description="prompt embeddings kept on the device (LRU)")

    # network
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    worker_id: str | None = Field(None, description="prefix of job ids, so a proxy can route them; default: port")
    trusted_proxies: str = Field("127.0.0.1,::1", description="peers whose X-Forwarded-* headers are honoured")
    public_url: str | None = Field(None, description="base of image_url when set, e.g. https://api.example.com")
    keepalive_timeout_s: int = Field(75, description="longer than the proxy's upstream keepalive_timeout")
    cors_origins: str = Field("", description="comma-separated origins allowed by CORS; empty: CORS off")

    # queue
    max_concurrent: int = Field(2, ge=1, le=64, description="images generated together (one batched call)")
    max_queue_size: int = Field(100, ge=0, description="requests waiting beyond the running ones")
    batch_wait_ms: float = Field(0.0, ge=0, le=1000, description="how long a partial batch waits for partners")
    request_timeout_s: float = Field(600.0, gt=0, description="default deadline of a request, queue included")
    drain_timeout_s: float = Field(30.0, ge=0, description="how long SIGTERM waits for accepted work",
                                   # the scripts and docs name it FLUX_DRAIN_TIMEOUT
                                   validation_alias=AliasChoices("FLUX_DRAIN_TIMEOUT_S", "FLUX_DRAIN_TIMEOUT"))
    max_consecutive_failures: int = Field(3, ge=1, description="GPU failures in a row that flip /health to 503")

    # storage and retention
    output_dir: str = "outputs"
    output_format: OutputFormat = Field("png", description="format of the images unless a "
                                                          "request says (png: lossless; jpeg: fastest to encode)")
    output_quality: int = Field(90, ge=1, le=100, description="jpeg/webp quality unless a request says")
    png_compress_level: int = Field(1, ge=0, le=9, description="zlib level of the PNGs (1: fast, 9: smallest)")
    image_ttl_s: float = Field(86400.0, ge=0, description="age at which generated images are deleted; 0: never")
    job_ttl_s: float = Field(3600.0, gt=0, description="how long finished jobs (and their images) are kept")

    # request limits and security
    max_body_bytes: int = Field(65536, ge=1024)
    max_prompt_chars: int = Field(2000, ge=1)
    api_keys: str = Field("", description="comma-separated API keys; empty: no authentication")
    api_key_file: str | None = Field(None, description="file with one API key per line")

    # custom models: LoRA adapters and input images (docs/API.md, docs/OPERATIONS.md)
    lora_dir: str | None = Field(None, description="folder of LoRA adapters, NAME.safetensors each; unset: no LoRAs")
    max_loras_per_request: int = Field(3, ge=1, le=8, description="adapters one request may combine (one "
                                       "device slot each, allocated at load)")
    lora_max_rank: int = Field(64, ge=1, le=512, description="highest adapter rank served; every slot is "
                               "allocated at this rank so adapters swap without recompiling")
    lora_cache: int = Field(8, ge=1, le=256, description="adapters kept converted in device memory (LRU)")
    max_image_bytes: int = Field(10_000_000, ge=1024, description="largest input image or mask file (decoded "
                                 "bytes); a body with images may exceed max_body_bytes by two of them in base64")

    log_level: str = "info"

    @field_validator("worker_id")
    @classmethod
    def _worker_id_chars(cls, value: str | None) -> str | None:
        if value is not None and not value.replace("_", "").isalnum():
            raise ValueError("FLUX_WORKER_ID may hold letters, digits and underscores only")
        return value

    @property
    def job_prefix(self) -> str:
        return self.worker_id or str(self.port)

    @property
    def warmup_size_list(self) -> list[tuple[int, int]] | None:
        if self.warmup_sizes.strip().lower() == "auto":
            return None
        sizes = []
        for item in filter(None, (s.strip() for s in self.warmup_sizes.split(","))):
            w, _, h = item.lower().partition("x")
            sizes.append((int(w), int(h or w)))
        return sizes

    def api_key_set(self) -> frozenset[str]:
        keys = {k.strip() for k in self.api_keys.split(",") if k.strip()}
        if self.api_key_file:
            with open(self.api_key_file, encoding="utf-8") as fh:
                keys |= {line.strip() for line in fh if line.strip() and not line.startswith("#")}
        return frozenset(keys)


def load_settings(precision: Precision, environ: dict[str, str] | None = None) -> Settings:
    """Settings for one worker: FLUX_* from the environment, precision from the entry point, the port from
    <PRECISION>_API_PORT (the guide's name) or FLUX_PORT."""
    env = os.environ if environ is None else environ
    overrides: dict = {"precision": precision}
    port = env.get(f"{precision.upper()}_API_PORT") or env.get("FLUX_PORT")
    if port:
        overrides["port"] = int(port)
    if env.get("FLUX_GPU_INDEX") is None:
        first = env.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        if first.isdigit():
            overrides["gpu_index"] = int(first)
    return Settings(**overrides)
