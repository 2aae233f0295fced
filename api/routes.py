"""The worker's core routes: /generate, /, /health, /live, /queue-stats, /images/{name}."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, RedirectResponse

from api import __version__
from api.errors import NotFound
from api.images import image_response
from api.runtime import Runtime, WorkerState, get_runtime, get_service
from api.service import ImageService

router = APIRouter()


@router.post("/generate")
async def generate(request: Request, service: ImageService = Depends(get_service)):
    job, _ = await service.submit_native(request, "/generate", detached=False)
    try:
        await service.wait(request, [job])
    finally:
        request.state.timing = (job.queue_ms, job.generate_ms)
    return service.result(request, job)


@router.get("/")
async def root(rt: Runtime = Depends(get_runtime)):
    info = rt.info
    return {
        "service": "flux-api",
        "version": __version__,
        "model": rt.settings.model,
        "synthetic": info.synthetic if info else rt.settings.model.startswith("dummy:"),
        "precision": info.precision if info else rt.settings.precision,
        "requested_precision": rt.settings.precision,
        "device": info.device_name if info else None,
        "gpu": rt.settings.gpu_index,
        "port": rt.settings.port,
        "worker_id": rt.settings.job_prefix,  # the prefix of its job ids and image names (proxy routing)
        "state": rt.state,
        "compiled": info.compiled if info else None,
        "default_steps": info.default_steps if info else None,
        "notes": info.notes if info else [],
        "endpoints": ["/generate", "/jobs", "/v1/images/generations", "/health", "/live", "/queue-stats",
                      "/metrics", "/images/{name}", "/loras"],
    }


@router.get("/health")
async def health(rt: Runtime = Depends(get_runtime)):
    state = rt.state
    body = {"status": state, "model": rt.settings.model, "precision": rt.settings.precision,
            "gpu": rt.settings.gpu_index}
    if rt.failure:
        body["reason"] = rt.failure
    if state == "loading":
        body["progress"] = rt.progress()
    if rt.store.remote:
        # a shared bucket that is down is not this worker's fault: /health stays as it is (pulling every
        # worker out of the balancer would turn retryable 503s into 502s) and says so here
        body["storage"] = "unavailable" if rt.store.last_error else "ok"
    return JSONResponse(body, status_code=200 if state == WorkerState.ready else 503)


@router.get("/live")
async def live():
    return {"status": "alive"}


@router.get("/queue-stats")
async def queue_stats(rt: Runtime = Depends(get_runtime)):
    stats = rt.queue.snapshot() if rt.queue else {}
    stats.update(rt.gpu_memory())
    stats["state"] = rt.state
    stats.update(rt.service.snapshot())
    stats["prompt_cache"] = rt.prompt_cache_stats()
    return stats


@router.get("/images/{name}")
async def image(name: str, rt: Runtime = Depends(get_runtime)):
    if rt.store.remote:  # S3: a fresh presigned URL (or the public one), checked to exist first
        url = await asyncio.to_thread(rt.store.redirect_url, name)
        if url is None:
            raise NotFound("no such image", field="name")
        return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
    return image_response(rt.store, name)  # api/images.py: the serving rules and headers
