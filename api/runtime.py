"""Runtime: what one worker holds (settings, engine, queue, store, state), kept on app.state.

Handlers reach it through the `get_runtime` dependency, so tests can build an app around any engine.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import time

from fastapi import Request

from api.http import IdempotencyStore
from api.loras import LoraRegistry
from api.metrics import Metrics
from api.service import ImageService
from api.settings import Settings
from api.image_stores import make_image_store

log = logging.getLogger(__name__)


class WorkerState(enum.StrEnum):
    """What /health says (the JSON values are these strings)."""
    loading = "loading"
    ready = "ready"
    degraded = "degraded"
    draining = "draining"
    failed = "failed"


class Runtime:
    def __init__(self, settings: Settings, engine):
        self.settings = settings
        self.engine = engine
        self.store = make_image_store(settings)
        self.queue = None
        self.info = None
        self.failure: str | None = None
        self.api_keys = settings.api_key_set()
        self.idempotency = IdempotencyStore(ttl_s=settings.job_ttl_s)
        self.jobstore = None  # api/jobstore.JobStore, opened in the lifespan
        self.service = ImageService(self)
        self.loras = LoraRegistry(settings, engine)
        self.trusted_proxies = frozenset(p.strip() for p in settings.trusted_proxies.split(",") if p.strip())
        gpu = "cpu" if settings.gpu_index is None else str(settings.gpu_index)
        self.metrics = Metrics(gpu=gpu, precision=settings.precision)
        self._state = WorkerState.loading
        self._nvml_handle = None
        self.load_seconds: float | None = None
        self.warmup_seconds: float | None = None

    @property
    def state(self) -> WorkerState:
        if self.queue is not None and self.queue.fatal_error and self._state != WorkerState.draining:
            return WorkerState.failed  # a dead GPU context or scheduler
        if self._state == WorkerState.ready and self.queue is not None and not self.queue.healthy():
            return WorkerState.degraded
        return self._state

    def set_state(self, state: WorkerState | str, failure: str | None = None) -> None:
        self._state = WorkerState(state)  # ValueError for a name that is not a state
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
            self.set_state(WorkerState.failed, f"model load failed: {type(exc).__name__}: {str(exc)[:300]}")
            return
        if self._state == WorkerState.loading:
            self.set_state(WorkerState.ready)
        log.info("ready: loaded in %.1f s, warm-up %.1f s", self.load_seconds, self.warmup_seconds)

    def progress(self) -> dict | None:
        """The engine's start-up progress (what it is loading or compiling, done/total, elapsed, expected)."""
        progress = getattr(self.engine, "progress", None)
        return progress() if callable(progress) else None

    def gpu_memory(self) -> dict:
        """Device memory and utilisation through nvidia-ml-py (what nvidia-smi shows), or nulls without a GPU."""
        empty = {"gpu_memory_used_mb": None, "gpu_memory_total_mb": None, "gpu_utilization_pct": None}
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
            # percent of the last sample period in which a kernel ran (nvidia-smi's GPU-Util); MIG slices
            # answer NOT_SUPPORTED, which must not cost the memory figures
            try:
                out["gpu_utilization_pct"] = pynvml.nvmlDeviceGetUtilizationRates(self._nvml_handle).gpu
            except pynvml.NVMLError:
                out["gpu_utilization_pct"] = None
        except Exception:  # nvml missing or refused: still report what torch knows
            out = dict(empty)
        out.update({f"torch_{k}": v for k, v in self.engine.memory_stats().items()})
        return out

    def prompt_cache_stats(self) -> dict:
        engine = self.engine
        return {"hits": getattr(engine, "prompt_cache_hits", 0), "misses": getattr(engine, "prompt_cache_misses", 0)}


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def get_service(request: Request) -> ImageService:
    return request.app.state.runtime.service
