"""create_app(settings, engine=None): the FastAPI app of one worker.

The port is bound before the model loads (the lifespan starts loading in the background), so /health can
answer "loading" and a balancer or the start script can watch progress.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import resource

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import __version__, jobs, lora_routes, openai_routes, routes
from api.errors import ApiError, InvalidRequest, NotFound
from api.jobstore import JobStore
from api.runtime import Runtime, WorkerState
from api.settings import Settings
from models.flux import EngineConfig, FluxEngine

log = logging.getLogger(__name__)
SWEEP_INTERVAL_S = 30.0


def build_engine(settings: Settings) -> FluxEngine:
    config = EngineConfig(
        model=settings.model, precision=settings.precision, device=settings.device, compile=settings.compile,
        prompt_cache_size=settings.prompt_cache_size, warmup_sizes=settings.warmup_size_list,
        warmup_steps=settings.warmup_steps, fp4_quant_type=settings.fp4_quant_type,
        compile_cache_dir=settings.compile_cache_dir, fuse_qkv=settings.fuse_qkv,
        attention_backend=settings.attention_backend, compile_mode=settings.compile_mode or None,
        compile_vae=settings.compile_vae, compile_dynamic=settings.compile_dynamic,
        lora_dir=settings.lora_dir, lora_slots=settings.max_loras_per_request, lora_max_rank=settings.lora_max_rank,
        lora_cache=settings.lora_cache,
    )
    if settings.parallel != "off":
        from models.parallel import GroupConfig, ParallelEngine

        return ParallelEngine(config, GroupConfig(
            mode=settings.parallel, world_size=settings.parallel_world_size, backend=settings.parallel_backend,
            timeout_s=settings.parallel_timeout_s, overlap=settings.parallel_overlap, log_level=settings.log_level))
    return FluxEngine(config)


def _queue_factory(precision: str):
    """The per-precision knobs module the guide points users to (api/fp4_routes.py, api/bf16_routes.py)."""
    return importlib.import_module(f"api.{precision}_routes").make_queue_manager


async def _sweep(rt: Runtime) -> None:
    """Expire finished jobs (with their images), old images and idempotency keys."""
    while True:
        await asyncio.sleep(min(SWEEP_INTERVAL_S, rt.settings.job_ttl_s / 2))
        try:
            gone = rt.queue.forget_finished(rt.settings.job_ttl_s)
            for job in gone:
                if job.detached and job.image_name:
                    rt.store.delete(job.image_name)
            if rt.jobstore is not None:  # a record and its image expire together
                rt.jobstore.forget([job.id for job in gone])
            rt.idempotency.sweep()
            if rt.settings.image_ttl_s > 0:
                await asyncio.to_thread(rt.store.sweep, rt.settings.image_ttl_s)
        except Exception:
            log.exception("retention sweep failed")


def _raise_open_file_limit() -> None:
    """Every event stream and waiting request holds a socket: lift the soft limit on open files (often 1024)
    to the hard one, so FLUX_MAX_EVENT_STREAMS, not the file table, is what bounds them."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
    except (ValueError, OSError):
        log.warning("could not raise the open-file limit; event streams may be refused early")


def _open_job_store(rt: Runtime) -> None:
    """Read back the jobs (and Idempotency-Keys) an earlier run of this worker recorded, then record anew."""
    store = JobStore(rt.settings.job_store_path)
    jobs, expired_images = store.load(rt.settings.job_ttl_s)
    for name in expired_images:
        rt.store.delete(name)
    rt.queue.restore(jobs)
    rt.queue.journal = store
    rt.idempotency.attach(store)
    rt.jobstore = store
    if jobs:
        log.info("restored %d jobs from %s", len(jobs), store.path)


def create_app(settings: Settings, engine=None) -> FastAPI:
    rt = Runtime(settings, engine if engine is not None else build_engine(settings))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        rt.store.ensure()
        rt.queue = _queue_factory(settings.precision)(
            settings, rt.engine, rt.store, batch_wait_ms=settings.batch_wait_ms, job_prefix=settings.job_prefix,
            max_consecutive_failures=settings.max_consecutive_failures, observer=rt.metrics.observe)
        _raise_open_file_limit()
        _open_job_store(rt)
        rt.queue.start()
        config = getattr(rt.engine, "config", None)
        if config is not None and hasattr(config, "warmup_batch"):
            config.warmup_batch = rt.queue.max_concurrent  # as built, knob files included
        loader = asyncio.create_task(rt.load(), name="model-load")
        sweeper = asyncio.create_task(_sweep(rt), name="retention")
        try:
            yield
        finally:
            rt.set_state(WorkerState.draining)
            await rt.queue.drain(settings.drain_timeout_s)
            for task in (loader, sweeper):
                task.cancel()
            await rt.queue.stop()
            rt.jobstore.close()

    # No trailing-slash redirects: Starlette builds their Location from the client's Host header (a URL any
    # client could point at another site) or, reached directly, from the worker's own address. "/generate/"
    # is an unknown route like any other.
    app = FastAPI(title="FLUX image generation API", version=__version__, lifespan=lifespan,
                  docs_url="/docs", redoc_url=None, redirect_slashes=False)
    app.state.runtime = rt

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(getattr(request.state, "request_id", None)), status_code=exc.status,
                            headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def request_validation(request: Request, exc: RequestValidationError):
        first = (exc.errors() or [{}])[0]
        field = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "path", "query")) or None
        err = InvalidRequest(f"{field}: {first.get('msg', 'invalid')}" if field else "invalid request", field=field)
        return await api_error(request, err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            err: ApiError = NotFound("no such route")
        else:
            err = ApiError(str(exc.detail))
            err.status, err.code = exc.status_code, "method_not_allowed" if exc.status_code == 405 else "http_error"
        return await api_error(request, err)

    # Any other exception is answered by RequestContext (api/middleware.py): a handler here would run in Starlette's
    # outermost middleware, which re-raises after answering and so resets the kept-alive connection.

    app.include_router(routes.router)
    app.include_router(jobs.router)
    app.include_router(openai_routes.router)
    lora_routes.install(app, rt)

    @app.get("/metrics")
    async def metrics():
        snapshot = rt.queue.snapshot() if rt.queue else {}
        body = rt.metrics.render(snapshot, rt.gpu_memory(), rt.state == WorkerState.ready)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    from api.middleware import RequestContext

    app.add_middleware(RequestContext, runtime_getter=lambda: rt)
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["*"])
    return app
