"""Asynchronous jobs: POST /jobs, GET/DELETE /jobs/{id}, GET /jobs/{id}/events (Server-Sent Events).

Job ids start with the worker id (`8003-…`), so the proxy sends every call about a job to the worker that
owns it; job state lives in that worker (in memory, recorded in its JobStore), next to the GPU that renders
it. The rules (ownership, idempotency, stream limits) are in api/service.py.
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from api.runtime import get_service
from api.service import ImageService

router = APIRouter()


@router.post("/jobs", status_code=202)
async def create_job(request: Request, service: ImageService = Depends(get_service)):
    job, reused = await service.submit_native(request, "/jobs", detached=True)
    view = service.view(request, job)
    return JSONResponse(view, status_code=200 if reused else 202, headers={"Location": view["status_url"]})


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, request: Request, service: ImageService = Depends(get_service)):
    return service.view(request, service.find(request, job_id))


@router.delete("/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request, service: ImageService = Depends(get_service)):
    return await service.cancel(request, job_id)


@router.get("/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request, service: ImageService = Depends(get_service)):
    return service.events(request, job_id)
