"""Every knob of a worker, read once at start-up from the environment (prefix FLUX_).

Nothing else in the service reads os.environ: the Settings object is built by the entry point and passed
down. The port is the one exception to the prefix, as the user guide names it per precision:
FP4_API_PORT / BF16_API_PORT / FP8_API_PORT (FLUX_PORT is accepted for any precision).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator
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
    compile_dynamic: bool = Field(True, description="compile the blocks once for every image size and batch "
                                  "(dynamic shapes); false: one graph per size, as torch.compile does by default")
    compile_vae: bool = Field(False, description="also torch.compile the VAE decoder (GPU only): schnell 1024²/4 "
                              "0.606 vs 0.695 s on H200, +47 s of cold warm-up")
    prompt_cache_size: int = Field(64, ge=0, description="prompt embeddings kept on the device (LRU)")

    # latency mode: one worker renders each image on a group of GPUs (models/parallel.py)
    parallel: Literal["off", "ulysses", "ring"] = Field("off", description="context parallelism across the "
                                                         "worker's GPUs (diffusers' Ulysses or ring attention)")
    gpus_per_worker: int | None = Field(None, ge=1, le=64, description="GPUs of this worker's group; default: "
                                        "the number CUDA_VISIBLE_DEVICES lists (1 when it lists none)")
    parallel_backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="torch.distributed backend; "
                                                               "auto: nccl (gloo only for CPU tests)")
    parallel_overlap: bool = Field(False, description="let the compiler move the group's all-to-alls to overlap "
                                   "computation (inductor reorder_for_compute_comm_overlap; compiled GPUs only)")
    parallel_timeout_s: float = Field(300.0, gt=0, description="longest wait in one collective before the "
                                      "group gives up (a last resort: a dead rank is seen within a second)")

    # network
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    worker_id: str | None = Field(None, description="prefix of job ids, so a proxy can route them; default: port")
    trusted_proxies: str = Field("127.0.0.1,::1", description="peers whose X-Forwarded-* headers are honoured")
    public_url: str | None = Field(None, description="base of image_url when set, e.g. https://api.example.com")
    keepalive_timeout_s: int = Field(75, description="longer than the proxy's upstream keepalive_timeout")
    cors_origins: str = Field("", description="comma-separated origins allowed by CORS; empty: CORS off")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection that has not sent a complete request "
                                    "header this long after it opened (or after its previous response) is closed")
    body_timeout_s: float = Field(30.0, gt=0, description="longest wait for each piece of a declared request body; "
                                  "past it the request is answered 408 and the connection closed")

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
    # shared image storage (api/storage_s3.py): credentials come from boto3's own chain (AWS_* variables,
    # shared config files, instance or pod roles), never from FLUX_* settings
    storage_url: str = Field("", description="s3://bucket/prefix stores images in an S3-compatible bucket; "
                             "empty: the local FLUX_OUTPUT_DIR")
    s3_endpoint_url: str | None = Field(None, description="endpoint of a non-AWS store (MinIO, Ceph RGW...)")
    s3_region: str | None = Field(None, description="bucket region; default: boto3's (AWS_DEFAULT_REGION)")
    s3_addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="auto: path-style with FLUX_S3_ENDPOINT_URL, else boto3's choice")
    s3_public_base_url: str | None = Field(None, description="public bucket or CDN: image_url is this + the key "
                                           "instead of a presigned URL")
    image_url_ttl_s: int = Field(3600, ge=1, le=604800, description="validity of presigned image URLs "
                                 "(S3 allows at most 7 days)")
    s3_timeout_s: float = Field(10.0, gt=0, le=120, description="longest wait for the store to connect or answer "
                                "one call; with one retry, a store that hangs fails a request within about twice this")
    state_dir: str | None = Field(None, description="folder of this worker's job records (SQLite, one file per "
                                  "worker: jobs-<worker id>.sqlite3), kept across restarts; default: "
                                  "<output_dir>/../run/jobs")

    # request limits and security
    max_body_bytes: int = Field(65536, ge=1024)
    max_prompt_chars: int = Field(2000, ge=1)
    api_keys: str = Field("", description="comma-separated API keys; empty: no authentication")
    api_key_file: str | None = Field(None, description="file with one API key per line")
    max_event_streams: int = Field(4096, ge=1, description="open GET /jobs/{id}/events streams one worker holds; "
                                   "past it a new stream is refused with 429 too_many_streams")
    max_event_streams_per_key: int = Field(64, ge=1, description="open event streams per API key (per client "
                                           "address when keys are off); past it 429 too_many_streams")

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

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        # uvicorn's levels; anything else would fail later, in logging's set-up, with a traceback
        if value.strip().lower() not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ValueError("use critical, error, warning, info, debug or trace")
        return value.strip().lower()

    @field_validator("worker_id")
    @classmethod
    def _worker_id_chars(cls, value: str | None) -> str | None:
        if value is not None and not value.replace("_", "").isalnum():
            raise ValueError("FLUX_WORKER_ID may hold letters, digits and underscores only")
        return value

    @field_validator("storage_url")
    @classmethod
    def _storage_url_shape(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return value
        if not value.startswith("s3://"):
            raise ValueError("FLUX_STORAGE_URL must be empty (local FLUX_OUTPUT_DIR) or s3://bucket[/prefix]")
        bucket = value[5:].partition("/")[0]
        # S3's bucket naming rules: 3-63 lowercase letters, digits, dots and hyphens, a letter/digit at each end
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            raise ValueError(f"FLUX_STORAGE_URL: {bucket!r} is not a valid bucket name")
        prefix = value[5 + len(bucket):].strip("/")
        if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
            raise ValueError("FLUX_STORAGE_URL: the prefix may not hold empty, '.' or '..' segments")
        return value

    @field_validator("s3_endpoint_url", "s3_public_base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value.strip()):
            raise ValueError("must be an http:// or https:// URL")
        return value.strip() if value else None

    @property
    def job_prefix(self) -> str:
        return self.worker_id or str(self.port)

    @property
    def job_store_path(self) -> Path:
        folder = Path(self.state_dir) if self.state_dir else Path(self.output_dir).resolve().parent / "run" / "jobs"
        return folder / f"jobs-{self.job_prefix}.sqlite3"

    @property
    def warmup_size_list(self) -> list[tuple[int, int]] | None:
        if self.warmup_sizes.strip().lower() == "auto":
            return None
        sizes = []
        for item in filter(None, (s.strip() for s in self.warmup_sizes.split(","))):
            w, _, h = item.lower().partition("x")
            sizes.append((int(w), int(h or w)))
        return sizes

    @property
    def parallel_world_size(self) -> int:
        """Processes (GPUs) that render one image: 1 unless FLUX_PARALLEL is on."""
        return 1 if self.parallel == "off" else (self.gpus_per_worker or 1)

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
        overrides["port"] = port  # validated with the rest: a bad value is a ValidationError naming the port
    if env.get("FLUX_GPU_INDEX") is None:
        first = env.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        if first.isdigit():
            overrides["gpu_index"] = int(first)
    if env.get("FLUX_GPUS_PER_WORKER") is None:
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        overrides["gpus_per_worker"] = max(1, len(visible))
    return Settings(**overrides)


# Values never echoed back in a start-up error: they may be secrets.
_SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD")


def _env_names(field: str, precision: Precision) -> list[str]:
    """The environment variables that set a Settings field (an error's loc is the field or an alias)."""
    if field == "port":
        return [f"{precision.upper()}_API_PORT", "FLUX_PORT"]
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        choices = [c for c in alias.choices if isinstance(c, str)] if isinstance(alias, AliasChoices) else []
        if field == name or field in choices:
            return choices or [f"FLUX_{name.upper()}"]
    return [field if field.isupper() else f"FLUX_{field.upper()}"]


def describe_invalid(exc: ValidationError, precision: Precision, environ: dict[str, str] | None = None) -> str:
    """One line per refused setting, named by the environment variable the operator set (FLUX_MAX_CONCURRENT,
    FP4_API_PORT, ...) with its value, for the worker's exit message instead of a traceback."""
    env = os.environ if environ is None else environ
    lines = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err.get("loc") else ""
        names = _env_names(field, precision)
        name = next((n for n in names if env.get(n) is not None), names[0])
        value = env.get(name)
        shown = "" if value is None else ("=<hidden>" if any(w in name for w in _SECRET_WORDS)
                                          else "=" + repr(value[:80]))
        lines.append(f"invalid setting {name}{shown}: {err['msg']}")
    return "\n".join(lines)
