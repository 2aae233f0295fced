"""Runtime: what one worker holds (settings, engine, queue, store, state), kept on app.state.

Handlers reach it through the `get_runtime` dependency, so tests can build an app around any engine.
"""
from __future__ import annotations

import asyncio
import logging
import time

from fastapi import Request

from api.http import IdempotencyStore
from api.loras import LoraRegistry
from api.metrics import Metrics
from api.settings import Settings
from api.storage import ImageStore

log = logging.getLogger(__name__)

STATES = ("loading", "ready", "degraded", "draining", "failed")


class Runtime:
    def __init__(self, settings: Settings, engine):
        self.settings = settings
        self.engine = engine
        self.store = ImageStore(settings.output_dir, settings.png_compress_level)
        self.queue = None
        self.info = None
        self.failure: str | None = None
        self.api_keys = settings.api_key_set()
        self.idempotency = IdempotencyStore(ttl_s=settings.job_ttl_s)
        self.loras = LoraRegistry(settings, engine)
        self.trusted_proxies = frozenset(p.strip() for p in settings.trusted_proxies.split(",") if p.strip())
        gpu = "cpu" if settings.gpu_index is None else str(settings.gpu_index)
        self.metrics = Metrics(gpu=gpu, precision=settings.precision)
        self._state = "loading"
        self._nvml_handle = None
        self.load_seconds: float | None = None
        self.warmup_seconds: float | None = None

    @property
    def state(self) -> str:
        if self._state == "ready" and self.queue is not None:
            if self.queue.fatal_error:
                return "failed"
            if not self.queue.healthy():
                return "degraded"
        return self._state

    def set_state(self, state: str, failure: str | None = None) -> None:
        assert state in STATES
        self._state = state
        if failure:
            self.failure = failure

    async def load(self) -> None:
        """Load and warm the pipeline off the event loop; /health says "loading" meanwhile."""
        started = time.perf_counter()
        try:
            self.info = await asyncio.to_thread(self.engine.load)
            self.load_seconds = time.perf_counter() - started
            self.warmup_seconds = await asyncio.to_thread(self.engine.warmup)
        except Exception as exc:  # the process stays up to say why on /health; supervision decides
            log.exception("loading %s failed", self.settings.model)
            self.set_state("failed", f"model load failed: {type(exc).__name__}: {str(exc)[:300]}")
            return
        if self._state == "loading":
            self.set_state("ready")
        log.info("ready: loaded in %.1f s, warm-up %.1f s", self.load_seconds, self.warmup_seconds)

    def gpu_memory(self) -> dict:
        """Device memory through nvidia-ml-py (what nvidia-smi shows), or nulls without a GPU."""
        empty = {"gpu_memory_used_mb": None, "gpu_memory_total_mb": None}
        info = self.info
        if info is None or not info.device.startswith("cuda"):
            return empty
        try:
            import pynvml

            if self._nvml_handle is None:
                pynvml.nvmlInit()
                import torch

                uuid = str(torch.cuda.get_device_properties(0).uuid)
                handle = None
                for i in range(pynvml.nvmlDeviceGetCount()):
                    h = pynvml.nvmlDeviceGetHandleByIndex(i)
                    if uuid.replace("GPU-", "") in str(pynvml.nvmlDeviceGetUUID(h)):
                        handle = h
                self._nvml_handle = handle or pynvml.nvmlDeviceGetHandleByIndex(0)
            mem = pynvml.nvmlDeviceGetMemoryInfo(self._nvml_handle)
            out = {"gpu_memory_used_mb": round(mem.used / 2**20, 1), "gpu_memory_total_mb": round(mem.total / 2**20, 1)}
        except Exception:  # nvml missing or refused: still report what torch knows
            out = dict(empty)
        out.update({f"torch_{k}": v for k, v in self.engine.memory_stats().items()})
        return out

    def prompt_cache_stats(self) -> dict:
        engine = self.engine
        return {"hits": getattr(engine, "prompt_cache_hits", 0), "misses": getattr(engine, "prompt_cache_misses", 0)}


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime
