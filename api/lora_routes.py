"""GET /loras (the adapters this worker serves) and the LoRA/compile numbers on /metrics."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from api.runtime import Runtime, get_runtime

router = APIRouter()


@router.get("/loras")
async def loras(rt: Runtime = Depends(get_runtime)):
    listing = await asyncio.to_thread(rt.loras.listing)  # a header read per file: off the event loop
    stats = rt.engine.lora_stats() if hasattr(rt.engine, "lora_stats") else {}
    return {"enabled": stats.get("slots") is not None, "max_per_request": rt.settings.max_loras_per_request,
            "max_rank": rt.settings.lora_max_rank, "cache_size": rt.settings.lora_cache, "data": listing}


class LoraCollector:
    """Read at scrape time from the engine: compiles since start and since ready (0 is the goal), adapter cache."""

    def __init__(self, rt: Runtime):
        self.rt = rt

    def collect(self):
        labels = self.rt.metrics.labels
        engine = self.rt.engine
        stats = engine.lora_stats() if hasattr(engine, "lora_stats") else {}
        names, values = list(labels), list(labels.values())
        compiles = CounterMetricFamily("flux_compiles", "torch.compile (dynamo) compilations in this process",
                                       labels=names)
        compiles.add_metric(values, stats.get("compiles_total", 0))
        yield compiles
        after = GaugeMetricFamily("flux_compiles_after_ready", "compilations after warm-up (recompiles a request "
                                  "paid for); 0 is the goal", labels=names)
        after.add_metric(values, stats.get("compiles_after_ready") or 0)
        yield after
        for key, help_text in (("hits", "adapter uses served from the device cache"),
                               ("misses", "adapter files read and converted"),
                               ("swaps", "adapter copies into a slot (hot-swap)")):
            metric = CounterMetricFamily(f"flux_lora_{key}", help_text, labels=names)
            metric.add_metric(values, stats.get(key, 0))
            yield metric
        cached = GaugeMetricFamily("flux_lora_cached", "adapters held in device memory", labels=names)
        cached.add_metric(values, len(stats.get("cached", [])))
        yield cached


def install(app, rt: Runtime) -> None:
    app.include_router(router)
    rt.metrics.registry.register(LoraCollector(rt))
