"""/health and /live through a worker's life: loading, ready, draining, failed; GPU failures while serving."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from api.app import create_app
from models.flux import EngineConfig, FluxEngine
from tests.unit.support import (SMALL, BlockingLoadEngine, FailingPipe, GatedEngine, OutOfMemoryPipe,
                                PreloadedEngine, assert_json_error, make_settings, queue_stats, serve,
                                wait_for_state, wait_until)

pytestmark = pytest.mark.anyio


async def test_health_says_loading_until_the_model_is_ready(bf16_engine, tmp_path):
    engine = BlockingLoadEngine(bf16_engine)
    app = create_app(make_settings(tmp_path), engine)
    async with serve(app, ready=False) as http:
        try:
            assert await asyncio.to_thread(engine.loading.wait, 10)
            health = await http.get("/health")
            assert health.status_code == 503
            assert health.json()["status"] == "loading"
            assert (await http.get("/live")).status_code == 200
            assert (await http.get("/")).json()["state"] == "loading"
            refused = await http.post("/generate", json=SMALL)
            error = assert_json_error(refused, 503, "not_ready")
            assert error["retryable"] is True and "retry-after" in refused.headers
            assert engine.batches == []
        finally:
            engine.release.set()
        body = await wait_for_state(http, "ready")
        assert (body["model"], body["precision"]) == ("dummy:tiny", "bf16")
        assert (await http.get("/health")).status_code == 200
        assert (await http.post("/generate", json=SMALL)).status_code == 200


async def test_health_says_failed_with_the_reason_when_the_load_raises(tmp_path):
    missing = tmp_path / "no-such-model"
    engine = FluxEngine(EngineConfig(model=str(missing), device="cpu"))  # the real loader, a bad path
    app = create_app(make_settings(tmp_path, model=str(missing)), engine)
    async with serve(app, ready=False) as http:
        body = await wait_for_state(http, "failed")
        health = await http.get("/health")
        assert health.status_code == 503
        assert "model load failed" in body["reason"] and str(missing) in body["reason"]
        assert "Traceback" not in health.text
        assert (await http.get("/live")).json() == {"status": "alive"}
        assert (await http.get("/")).json()["state"] == "failed"
        assert_json_error(await http.post("/generate", json=SMALL), 503, "not_ready")


async def test_live_and_health_when_ready(bf16_engine, tmp_path):
    app = create_app(make_settings(tmp_path, gpu_index=2), PreloadedEngine(bf16_engine))
    async with serve(app) as http:
        health = await http.get("/health")
        assert health.status_code == 200
        assert health.json() == {"status": "ready", "model": "dummy:tiny", "precision": "bf16", "gpu": 2}
        live = await http.get("/live")
        assert live.status_code == 200 and live.json() == {"status": "alive"}


async def test_shutdown_drains_accepted_work_and_refuses_new_work(bf16_engine, tmp_path):
    """The lifespan's exit (uvicorn's shutdown) turns /health to draining, answers what it accepted."""
    engine = GatedEngine(bf16_engine, closed=True)
    app = create_app(make_settings(tmp_path, max_concurrent=1, drain_timeout_s=20), engine)
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40123), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30) as http:
        shutdown = None
        try:
            await wait_for_state(http, "ready")
            running = asyncio.create_task(http.post("/generate", json=SMALL))
            assert await asyncio.to_thread(engine.entered.wait, 10)
            queued = asyncio.create_task(http.post("/generate", json=dict(SMALL, seed=8, width=320)))

            async def is_queued():
                return (await queue_stats(http))["queued"] == 1

            await wait_until(is_queued)
            shutdown = asyncio.create_task(lifespan.__aexit__(None, None, None))
            body = await wait_for_state(http, "draining", timeout=5)
            assert body["status"] == "draining"
            assert (await http.get("/health")).status_code == 503
            refused = await http.post("/generate", json=dict(SMALL, seed=9))
            assert_json_error(refused, 503, "draining")
            assert "retry-after" in refused.headers
            assert not shutdown.done(), "shutdown did not wait for the request on the GPU"
        finally:
            engine.gate.set()
        assert (await running).status_code == 200
        assert (await queued).status_code == 200  # accepted before the drain: answered, not dropped
        await asyncio.wait_for(shutdown, 20)
    assert [s.seed for batch in engine.batches for s in batch] == [7, 8]


async def test_out_of_memory_is_a_retryable_503_and_the_worker_keeps_serving(bf16_engine, tmp_path, monkeypatch):
    engine = PreloadedEngine(bf16_engine)
    engine.pipe = OutOfMemoryPipe(bf16_engine.pipe, times=1)
    released = []
    real_release = engine.release_memory
    monkeypatch.setattr(engine, "release_memory", lambda: (released.append(True), real_release()))
    async with serve(create_app(make_settings(tmp_path), engine)) as http:
        response = await http.post("/generate", json=SMALL)
        error = assert_json_error(response, 503, "out_of_memory")
        assert error["retryable"] is True
        assert int(response.headers["retry-after"]) >= 1
        assert "20.00 GiB" not in response.text  # the device's message is logged, not sent
        assert released == [True]
        assert (await http.get("/health")).status_code == 200
        ok = await http.post("/generate", json=SMALL)
        assert ok.status_code == 200, ok.text
        stats = await queue_stats(http)
        assert (stats["failed"], stats["completed"]) == (1, 1)


async def test_repeated_gpu_failures_turn_health_to_degraded_until_a_success(bf16_engine, tmp_path):
    engine = PreloadedEngine(bf16_engine)
    engine.pipe = OutOfMemoryPipe(bf16_engine.pipe, times=2)
    async with serve(create_app(make_settings(tmp_path, max_consecutive_failures=2), engine)) as http:
        assert_json_error(await http.post("/generate", json=SMALL), 503, "out_of_memory")
        assert (await http.get("/health")).status_code == 200
        assert_json_error(await http.post("/generate", json=SMALL), 503, "out_of_memory")
        health = await http.get("/health")
        assert (health.status_code, health.json()["status"]) == (503, "degraded")
        assert (await http.post("/generate", json=SMALL)).status_code == 200  # still accepts work
        assert (await http.get("/health")).json()["status"] == "ready"


async def test_a_sticky_cuda_error_marks_the_worker_failed(bf16_engine, tmp_path):
    engine = PreloadedEngine(bf16_engine)
    engine.pipe = FailingPipe(bf16_engine.pipe, lambda: RuntimeError(
        "CUDA error: an illegal memory access was encountered\nCompile with TORCH_USE_CUDA_DSA"), times=1)
    async with serve(create_app(make_settings(tmp_path), engine)) as http:
        response = await http.post("/generate", json=SMALL)
        assert_json_error(response, 500, "generation_failed")
        assert "illegal memory access" not in response.text
        health = await http.get("/health")
        assert (health.status_code, health.json()["status"]) == (503, "failed")
        assert_json_error(await http.post("/generate", json=SMALL), 503, "not_ready")
        assert len(engine.batches) == 1


async def test_an_unexpected_error_is_a_500_without_a_traceback(bf16_engine, tmp_path):
    engine = PreloadedEngine(bf16_engine)
    engine.pipe = FailingPipe(bf16_engine.pipe, lambda: ValueError("secret internal detail"), times=1)
    async with serve(create_app(make_settings(tmp_path), engine)) as http:
        response = await http.post("/generate", json=SMALL)
        assert_json_error(response, 500, "generation_failed")
        assert "secret internal detail" not in response.text
        assert (await http.get("/health")).status_code == 200
        assert (await http.post("/generate", json=SMALL)).status_code == 200
