"""ImageService: the one place a generation request is admitted, waited on, cancelled, streamed and shown.

The routers (/generate, /jobs, /jobs/{id}, /jobs/{id}/events, /v1/images/generations) parse their own
request shape and call this; it owns the rules they share:

- admission: Idempotency-Key lookup (scoped to the caller), readiness, then all of a request's images or none
  (QueueManager.submit_many);
- ownership: with API keys on, a job is visible only to the key that created it; any other key gets the same
  404 as an unknown id. With keys off every caller shares every job;
- waiting: on the job's events and the client's http.disconnect message, never a timer loop. A disconnect
  cancels a job only when no other request is still waiting on it (an Idempotency-Key retry may be), and
  never a detached /jobs job. If one image of a multi-image request fails, its siblings are cancelled;
- event streams: bounded per worker and per caller (API key, or client address with keys off); each waits on
  the job's change event, with a keep-alive comment every 15 s.

It lives on the Runtime (rt.service) and handlers reach it through `get_service`.
"""
from __future__ import annotations

import asyncio
import collections
import json
from typing import Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from api.errors import Cancelled, NotFound, TooManyStreams
from api.http import (base_url, client_address, ensure_accepting, idempotency_key, job_error, make_spec,
                      output_options, parse_generate, read_json_object)
from api.inputs import prepare_inputs
from api.queue import FINAL, Job, JobStatus
from models.flux import ImageSpec

KEEPALIVE_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream
CANCEL_ANSWER_S = 30.0
EVENT_CACHE_SIZE = 1024  # jobs whose last encoded event is kept for the other streams watching them  # DELETE of a running job answers once the GPU let go of it, or after this long


class EventStream(StreamingResponse):
    """A text/event-stream response that gives its slot back however it ends (finished, client gone,
    server stopping), even if its body was never started."""

    def __init__(self, content, release):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


class ImageService:
    def __init__(self, rt):
        self.rt = rt
        self.streams_open = 0
        self.streams_by_caller: collections.Counter[str] = collections.Counter()
        self._event_cache: collections.OrderedDict[str, tuple[int, str, str]] = collections.OrderedDict()

    @property
    def queue(self):
        return self.rt.queue

    # ---- who is asking --------------------------------------------------------------------------
    def owner(self, request: Request) -> str:
        """The principal a job belongs to: the API key id, or "" (everyone) with keys off."""
        return (getattr(request.state, "api_key_id", "") or "") if self.rt.api_keys else ""

    def caller(self, request: Request) -> str:
        """Whom a per-caller limit counts: the API key, or the client address when keys are off (behind a
        trusted proxy, the address it names: see client_address)."""
        if self.rt.api_keys:
            return "key:" + (getattr(request.state, "api_key_id", "") or "")
        return "addr:" + client_address(request, self.rt.trusted_proxies)

    # ---- admission ------------------------------------------------------------------------------
    async def read_generate(self, request: Request):
        """The native body (/generate, /jobs): parsed and validated, or a named 4xx."""
        data = await read_json_object(request, self.rt.settings.max_body_bytes, self.rt.settings.max_image_bytes)
        return data, parse_generate(data, self.rt.settings.max_prompt_chars)

    def admit(self, request: Request, route: str, data: dict, make_specs: Callable[[], list[ImageSpec]],
              output: dict, *, timeout_s: float | None = None, detached: bool = False) -> tuple[list[Job], bool]:
        """Queue all of the images or none; returns (jobs, reused), reused when an Idempotency-Key matched.
        The specs are made only once the worker accepts work (their defaults come from the loaded model)."""
        rt = self.rt
        key = idempotency_key(request)
        fingerprint = rt.idempotency.fingerprint(route, data) if key else ""
        if key:
            job_ids = rt.idempotency.lookup(key, fingerprint)
            jobs = [rt.queue.get(job_id) for job_id in job_ids or ()]
            if jobs and all(job is not None for job in jobs) and not any(map(_worth_retrying, jobs)):
                for job in jobs:
                    job.detached = job.detached or detached
                return jobs, True
        ensure_accepting(rt.state)
        jobs = rt.queue.submit_many(make_specs(), timeout_s=timeout_s or rt.settings.request_timeout_s,
                                    request_id=request.state.request_id, idempotency_key=key,
                                    owner=self.owner(request), detached=detached, **output)
        if key:
            rt.idempotency.remember(key, fingerprint, [job.id for job in jobs])
        return jobs, False

    async def submit_native(self, request: Request, route: str, *, detached: bool) -> tuple[Job, bool]:
        data, req = await self.read_generate(request)
        output = output_options(req, self.rt.settings)
        inputs = await prepare_inputs(req, self.rt)  # adapters checked against their files, input images decoded
        jobs, reused = self.admit(request, route, data, lambda: [make_spec(req, self.rt.info, inputs)], output,
                                  timeout_s=req.timeout_s, detached=detached)
        return jobs[0], reused

    # ---- waiting --------------------------------------------------------------------------------
    async def wait(self, request: Request, jobs: list[Job]) -> None:
        """Wait until every job is finished, or the client hangs up. Raises the first job's error (or
        Cancelled when the client left first) unless all succeeded."""
        for job in jobs:
            job.waiters += 1
        gone = asyncio.ensure_future(_disconnected(request))
        finished = {asyncio.ensure_future(job.done.wait()): job for job in jobs}
        client_left = False
        try:
            pending = set(finished)
            while pending:
                done, _ = await asyncio.wait(pending | {gone}, return_when=asyncio.FIRST_COMPLETED)
                if gone in done:
                    client_left = True
                    break
                pending -= done
                if any(finished[t].status != JobStatus.succeeded for t in done):
                    for job in jobs:  # all or nothing: the request fails, so its other images stop
                        self.queue.cancel(job, "a sibling image failed")
        finally:
            gone.cancel()
            for task in finished:
                task.cancel()
            for job in jobs:
                job.waiters -= 1
                # a detached job is polled later; one another request still waits on is still wanted
                if client_left and job.waiters == 0 and not job.detached:
                    self.queue.cancel(job, "disconnect")
        # the image that failed speaks for the request, not the siblings cancelled because of it
        failed = next((job for job in jobs if job.status == JobStatus.failed), None) or \
            next((job for job in jobs if job.status != JobStatus.succeeded), None)
        if failed is not None:
            raise job_error(failed) if failed.done.is_set() else Cancelled("the client disconnected")

    # ---- one job --------------------------------------------------------------------------------
    def find(self, request: Request, job_id: str) -> Job:
        job = self.queue.get(job_id) if self.queue else None
        if job is None or job.owner != self.owner(request):  # someone else's job reads as unknown
            raise NotFound(f"no job {job_id!r} (unknown, or expired after {int(self.rt.settings.job_ttl_s)} s)",
                           field="job_id")
        return job

    async def cancel(self, request: Request, job_id: str) -> dict:
        job = self.find(request, job_id)
        self.queue.cancel(job, "client")
        if job.status == JobStatus.running:
            # stops at the next denoising step; answer once the GPU has let go of it (bounded wait)
            try:
                await asyncio.wait_for(job.done.wait(), CANCEL_ANSWER_S)
            except asyncio.TimeoutError:
                pass
        return self.view(request, job)

    def result(self, request: Request, job: Job) -> dict:
        """The body of a finished /generate (and a job's `result`)."""
        rt, info, spec = self.rt, self.rt.info, job.spec
        return {
            "image_url": rt.store.url_for(job.image_name, base_url(request, rt.trusted_proxies, rt.settings.public_url)),
            "seed": spec.seed,
            "width": spec.width,
            "height": spec.height,
            "num_inference_steps": spec.steps,
            "guidance_scale": spec.guidance,
            "model": info.model if info else rt.settings.model,
            "synthetic": info.synthetic if info else rt.settings.model.startswith("dummy:"),
            "precision": info.precision if info else rt.settings.precision,
            "gpu": rt.settings.gpu_index,
            "queue_ms": job.queue_ms,
            "generate_ms": job.generate_ms,
            "request_id": job.request_id,
            "job_id": job.id,
            "output_format": job.output_format,
        }

    def view(self, request: Request, job: Job) -> dict:
        view = {
            "job_id": job.id,
            "status": job.status.value,
            "status_url": f"/jobs/{job.id}",
            "created_at": job.created_wall,
            "request_id": job.request_id,
        }
        if job.status == JobStatus.queued:
            view["position"] = self.queue.position(job)
            view["eta_s"] = round(self.queue.estimated_wait_s(job), 2)
        elif job.status == JobStatus.running:
            view["step"] = job.step
            view["total_steps"] = job.spec.steps
            view["cancelling"] = bool(job.cancel_reason)
            view["eta_s"] = round(self.queue.remaining_seconds(job), 2)
        elif job.status == JobStatus.succeeded:
            view["result"] = self.result(request, job)
        if job.error is not None:
            view["error"] = job.error.body()["error"]
        if job.finished_wall:
            view["finished_at"] = job.finished_wall
        return view

    # ---- event streams --------------------------------------------------------------------------
    def events(self, request: Request, job_id: str) -> EventStream:
        job = self.find(request, job_id)
        settings, caller = self.rt.settings, self.caller(request)
        if self.streams_open >= settings.max_event_streams:
            raise TooManyStreams(f"this worker holds its maximum of {settings.max_event_streams} event streams; "
                                 "poll GET /jobs/{id} or retry later", retry_after=5)
        if self.streams_by_caller[caller] >= settings.max_event_streams_per_key:
            raise TooManyStreams(f"at most {settings.max_event_streams_per_key} open event streams per API key "
                                 "(per client address without keys); close one, or poll GET /jobs/{id}",
                                 retry_after=5)
        self.streams_open += 1
        self.streams_by_caller[caller] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.streams_open -= 1
                self.streams_by_caller[caller] -= 1
                if self.streams_by_caller[caller] <= 0:
                    del self.streams_by_caller[caller]

        return EventStream(self._stream(request, job), release)

    async def _stream(self, request: Request, job: Job):
        seen = -1
        while True:
            changed = job.changed  # taken before reading the job, so no change between read and wait is missed
            if job.version != seen:
                seen = job.version
                yield self._event(request, job)
            if job.status in FINAL:
                yield "event: done\ndata: {}\n\n"
                return
            try:
                await asyncio.wait_for(changed.wait(), KEEPALIVE_S)
            except asyncio.TimeoutError:
                yield ": keep-alive\n\n"

    def _event(self, request: Request, job: Job) -> str:
        """The SSE event of the job's current version. Thousands of streams may watch one job: the view is
        built and encoded once per change (per base URL, which only a result's image_url depends on)."""
        base = base_url(request, self.rt.trusted_proxies, self.rt.settings.public_url) \
            if job.status == JobStatus.succeeded else ""
        cached = self._event_cache.get(job.id)
        if cached is not None and cached[0] == job.version and cached[1] == base:
            return cached[2]
        view = self.view(request, job)
        text = f"event: {view['status']}\ndata: {json.dumps(view)}\n\n"
        self._event_cache[job.id] = (job.version, base, text)
        if len(self._event_cache) > EVENT_CACHE_SIZE:
            self._event_cache.popitem(last=False)
        return text

    def snapshot(self) -> dict:
        return {"event_streams": self.streams_open}


def _worth_retrying(job: Job) -> bool:
    """A job whose client hung up, or that failed with a retryable error, produced no image: a retry under
    its Idempotency-Key starts a new attempt instead of replaying that outcome forever."""
    if job.cancel_reason == "disconnect":  # cancelled, or about to be at its next step
        return True
    return job.status == JobStatus.failed and job.error is not None and job.error.retryable


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up: the server hands the app an http.disconnect message (the body was
    read already, so nothing else arrives on this channel)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
