"""The worker's core routes: /generate, /, /health, /live, /queue-stats, /images/{name}."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse

from api import __version__
from api.errors import NotFound
from api.inputs import prepare_inputs
from api.http import (base_url, ensure_accepting, idempotency_key, job_error, make_spec, output_options,
                      parse_generate, read_json_object, wait_for_job)
from api.queue import Job, JobStatus
from api.runtime import Runtime, get_runtime

router = APIRouter()


def job_response(rt: Runtime, request: Request, job: Job) -> dict:
    info = rt.info
    spec = job.spec
    return {
        "image_url": f"{base_url(request, rt.trusted_proxies, rt.settings.public_url)}/images/{job.image_name}",
        "seed": spec.seed,
        "width": spec.width,
        "height": spec.height,
        "num_inference_steps": spec.steps,
        "guidance_scale": spec.guidance,
        "model": info.model,
        "synthetic": info.synthetic,
        "precision": info.precision,
        "gpu": rt.settings.gpu_index,
        "queue_ms": job.queue_ms,
        "generate_ms": job.generate_ms,
        "request_id": job.request_id,
        "job_id": job.id,
        "output_format": job.output_format,
    }


def _worth_retrying(job: Job) -> bool:
    """A job whose client hung up, or that failed with a retryable error, produced no image: a retry under
    its Idempotency-Key starts a new attempt instead of replaying that outcome forever."""
    if job.cancel_reason == "disconnect":  # cancelled, or about to be at its next step
        return True
    return job.status == JobStatus.failed and job.error is not None and job.error.retryable


async def submit_request(rt: Runtime, request: Request, route: str) -> tuple[Job, bool]:
    """Validate and enqueue a generation; returns (job, reused) where reused means an Idempotency-Key match."""
    data = await read_json_object(request, rt.settings.max_body_bytes, rt.settings.max_image_bytes)
    req = parse_generate(data, rt.settings.max_prompt_chars)
    key = idempotency_key(request)
    fingerprint = rt.idempotency.fingerprint(route, data) if key else ""
    if key:
        job_id = rt.idempotency.lookup(key, fingerprint)
        job = rt.queue.get(job_id) if job_id else None
        if job is not None and not _worth_retrying(job):
            return job, True
    ensure_accepting(rt.state)
    timeout = req.timeout_s or rt.settings.request_timeout_s
    inputs = await prepare_inputs(req, rt)
    job = rt.queue.submit(make_spec(req, rt.info, inputs), timeout_s=timeout, request_id=request.state.request_id,
                          idempotency_key=key, **output_options(req, rt.settings))
    if key:
        rt.idempotency.remember(key, fingerprint, job.id)
    return job, False


@router.post("/generate")
async def generate(request: Request, rt: Runtime = Depends(get_runtime)):
    job, _ = await submit_request(rt, request, "/generate")
    await wait_for_job(request, rt.queue, job)
    request.state.timing = (job.queue_ms, job.generate_ms)
    if job.status != JobStatus.succeeded:
        raise job_error(job)
    return job_response(rt, request, job)


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
    return JSONResponse(body, status_code=200 if state == "ready" else 503)


@router.get("/live")
async def live():
    return {"status": "alive"}


@router.get("/queue-stats")
async def queue_stats(rt: Runtime = Depends(get_runtime)):
    stats = rt.queue.snapshot() if rt.queue else {}
    stats.update(rt.gpu_memory())
    stats["state"] = rt.state
    stats["prompt_cache"] = rt.prompt_cache_stats()
    return stats


@router.get("/images/{name}")
async def image(name: str, rt: Runtime = Depends(get_runtime)):
    path = rt.store.path_for(name)
    if path is None:
        raise NotFound("no such image", field="name")
    return FileResponse(path, media_type=rt.store.media_type(path.name),
                        headers={"Cache-Control": "public, max-age=86400"})
