"""Asynchronous jobs: POST /jobs, GET/DELETE /jobs/{id}, GET /jobs/{id}/events (Server-Sent Events).

Job ids start with the worker id (`8003-…`), so the proxy sends every call about a job to the worker that
owns it; job state stays in that worker's memory, next to the GPU that renders it.
"""
from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from api.errors import NotFound
from api.queue import FINAL, Job, JobStatus
from api.routes import job_response, submit_request
from api.runtime import Runtime, get_runtime

router = APIRouter()


def job_view(rt: Runtime, request: Request, job: Job) -> dict:
    view = {
        "job_id": job.id,
        "status": job.status.value,
        "status_url": f"/jobs/{job.id}",
        "created_at": job.created_wall,
        "request_id": job.request_id,
    }
    if job.status == JobStatus.queued:
        position = rt.queue.position(job)
        view["position"] = position
        view["eta_s"] = round(rt.queue.estimated_wait_s(job), 2)
    elif job.status == JobStatus.running:
        view["step"] = job.step
        view["total_steps"] = job.spec.steps
        view["cancelling"] = bool(job.cancel_reason)
        view["eta_s"] = round(rt.queue.remaining_seconds(job), 2)
    elif job.status == JobStatus.succeeded:
        view["result"] = job_response(rt, request, job)
    if job.error is not None:
        view["error"] = job.error.body()["error"]
    if job.finished_wall:
        view["finished_at"] = job.finished_wall
    return view


def find_job(rt: Runtime, job_id: str) -> Job:
    job = rt.queue.get(job_id) if rt.queue else None
    if job is None:
        raise NotFound(f"no job {job_id!r} (unknown, or expired after {int(rt.settings.job_ttl_s)} s)",
                       field="job_id")
    return job


@router.post("/jobs", status_code=202)
async def create_job(request: Request, rt: Runtime = Depends(get_runtime)):
    job, reused = await submit_request(rt, request, "/jobs")
    job.detached = True
    view = job_view(rt, request, job)
    return JSONResponse(view, status_code=200 if reused else 202, headers={"Location": view["status_url"]})


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, request: Request, rt: Runtime = Depends(get_runtime)):
    return job_view(rt, request, find_job(rt, job_id))


@router.delete("/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request, rt: Runtime = Depends(get_runtime)):
    job = find_job(rt, job_id)
    rt.queue.cancel(job, "client")
    if job.status == JobStatus.running:
        # stops at the next denoising step; answer once the GPU has let go of it (bounded wait)
        try:
            await asyncio.wait_for(job.done.wait(), 30)
        except asyncio.TimeoutError:
            pass
    return job_view(rt, request, job)


@router.get("/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request, rt: Runtime = Depends(get_runtime)):
    job = find_job(rt, job_id)

    async def stream():
        seen_version, seen_position = -1, None
        heartbeat = time.monotonic()
        while True:
            position = rt.queue.position(job) if job.status == JobStatus.queued else None
            if job.version != seen_version or position != seen_position:
                seen_version, seen_position = job.version, position
                view = job_view(rt, request, job)
                yield f"event: {view['status']}\ndata: {json.dumps(view)}\n\n"
                heartbeat = time.monotonic()
            if job.status in FINAL:
                yield "event: done\ndata: {}\n\n"
                return
            if await request.is_disconnected():
                return
            if time.monotonic() - heartbeat > 15:
                yield ": keep-alive\n\n"
                heartbeat = time.monotonic()
            await asyncio.sleep(0.1)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
