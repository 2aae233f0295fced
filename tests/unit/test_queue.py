"""The bounded queue: full → 503 with Retry-After, batching of compatible jobs, the guide's knob."""
from __future__ import annotations

import ast
import asyncio
import importlib.util
import sys

import pytest

from api.app import create_app
from tests.unit.support import (ROOT, SMALL, GatedEngine, PreloadedEngine, assert_json_error, make_settings,
                                queue_stats, serve, wait_until)

pytestmark = pytest.mark.anyio

GUIDE_KNOB = "QueueManager(max_concurrent=3, max_queue_size=200)"


async def submit(http, body: dict, *, queued: int) -> asyncio.Task:
    """POST in the background and wait until the queue holds `queued` jobs, so arrival order is fixed."""
    task = asyncio.create_task(http.post("/generate", json=body))

    async def arrived():
        return (await queue_stats(http))["queued"] == queued

    await wait_until(arrived)
    return task


async def occupy_gpu(http, engine: GatedEngine, body: dict = SMALL) -> asyncio.Task:
    """Start a request that sits in the engine until the gate opens."""
    task = asyncio.create_task(http.post("/generate", json=body))
    assert await asyncio.to_thread(engine.entered.wait, 10), "the first request never reached the engine"
    return task


async def test_full_queue_answers_503_with_retry_after_and_never_reaches_the_engine(bf16_engine, tmp_path):
    engine = GatedEngine(bf16_engine, closed=True)
    app = create_app(make_settings(tmp_path, max_concurrent=1, max_queue_size=1), engine)
    async with serve(app) as http:
        try:
            running = await occupy_gpu(http, engine)
            waiting = await submit(http, dict(SMALL, seed=8), queued=1)
            stats = await queue_stats(http)
            refused = await asyncio.wait_for(http.post("/generate", json=dict(SMALL, seed=9)), 5)
            error = assert_json_error(refused, 503, "queue_full")
            assert error["retryable"] is True
            assert "full" in error["message"]
            # estimated from the measured seconds per image (1 s each before any was measured)
            expected = (stats["queued"] + stats["running"] + 1) * (stats["seconds_per_image"] or 1.0)
            assert refused.headers["retry-after"] == str(max(1, round(expected)))
        finally:
            engine.gate.set()
        assert (await running).status_code == 200
        assert (await waiting).status_code == 200
        stats = await queue_stats(http)
        assert (stats["completed"], stats["rejected"], stats["failed"]) == (2, 1, 0)
        assert [spec.seed for batch in engine.batches for spec in batch] == [7, 8]
        assert (await http.post("/generate", json=dict(SMALL, seed=9))).status_code == 200


async def test_a_zero_size_queue_serves_an_idle_gpu_and_refuses_when_busy(bf16_engine, tmp_path):
    engine = GatedEngine(bf16_engine, closed=True)
    app = create_app(make_settings(tmp_path, max_concurrent=1, max_queue_size=0), engine)
    async with serve(app) as http:
        try:
            running = await occupy_gpu(http, engine)
            assert_json_error(await http.post("/generate", json=SMALL), 503, "queue_full")
        finally:
            engine.gate.set()
        assert (await running).status_code == 200


async def test_compatible_jobs_share_one_engine_call_and_others_do_not(bf16_engine, tmp_path):
    engine = GatedEngine(bf16_engine, closed=True)
    app = create_app(make_settings(tmp_path, max_concurrent=2, max_queue_size=10), engine)
    async with serve(app) as http:
        try:
            first = await occupy_gpu(http, engine, dict(SMALL, seed=1))
            # arrival order: B, D (another size), C (compatible with B), E (other steps), F (other guidance)
            b = await submit(http, dict(SMALL, seed=2), queued=1)
            d = await submit(http, dict(SMALL, seed=4, width=320), queued=2)
            c = await submit(http, dict(SMALL, seed=3), queued=3)
            e = await submit(http, dict(SMALL, seed=5, num_inference_steps=3), queued=4)
            f = await submit(http, dict(SMALL, seed=6, guidance_scale=1.0), queued=5)
        finally:
            engine.gate.set()
        responses = [await t for t in (first, b, c, d, e, f)]
        assert [r.status_code for r in responses] == [200] * 6
        batches = [[spec.seed for spec in batch] for batch in engine.batches]
        assert batches == [[1], [2, 3], [4], [5], [6]]
        urls = {r.json()["image_url"] for r in responses}
        assert len(urls) == 6
        b_png, c_png = [(await http.get(r.json()["image_url"])).content for r in responses[1:3]]
        assert b_png != c_png  # one call, two seeds, two images


async def test_a_batch_holds_at_most_max_concurrent_jobs(bf16_engine, tmp_path):
    engine = GatedEngine(bf16_engine, closed=True)
    app = create_app(make_settings(tmp_path, max_concurrent=2, max_queue_size=10), engine)
    async with serve(app) as http:
        try:
            first = await occupy_gpu(http, engine, dict(SMALL, seed=1))
            rest = [await submit(http, dict(SMALL, seed=seed), queued=n) for n, seed in enumerate((2, 3, 4), 1)]
        finally:
            engine.gate.set()
        assert [(await t).status_code for t in [first, *rest]] == [200] * 4
        assert [[s.seed for s in batch] for batch in engine.batches] == [[1], [2, 3], [4]]


# ---- the knob the user guide points to ------------------------------------------------------------
def edit_knob(precision: str):
    """api/<precision>_routes.py as a user leaves it after following the guide: its QueueManager(...) call
    replaced by the guide's line. Returns the edited module."""
    path = ROOT / "api" / f"{precision}_routes.py"
    source = path.read_text()
    assert GUIDE_KNOB in source, f"{path.name} does not show the guide's QueueManager(...) line"
    calls = [node for node in ast.walk(ast.parse(source))
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "QueueManager"]
    assert calls, f"{path.name} never calls QueueManager(...)"
    lines = source.splitlines(keepends=True)
    for call in sorted(calls, key=lambda n: (n.lineno, n.col_offset), reverse=True):
        assert call.lineno == call.end_lineno, "a multi-line QueueManager call: extend this edit"
        line = lines[call.lineno - 1]
        lines[call.lineno - 1] = line[:call.col_offset] + GUIDE_KNOB + line[call.end_col_offset:]
    module_name = f"api.{precision}_routes"
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(module_name, loader=None))
    module.__file__ = str(path)
    exec(compile("".join(lines), str(path), "exec"), module.__dict__)
    return module


@pytest.mark.parametrize("precision", ["fp4", "bf16"])
async def test_the_guides_queue_knob_in_the_routes_file_takes_effect(request, precision, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, f"api.{precision}_routes", edit_knob(precision))
    engine = GatedEngine(request.getfixturevalue(f"{precision}_engine"), closed=True)
    app = create_app(make_settings(tmp_path, precision=precision), engine)  # env defaults: 2 and 100
    async with serve(app) as http:
        stats = await queue_stats(http)
        assert (stats["max_concurrent"], stats["max_queue_size"]) == (3, 200)
        try:
            first = await occupy_gpu(http, engine, dict(SMALL, seed=1))
            rest = [await submit(http, dict(SMALL, seed=seed), queued=n) for n, seed in enumerate((2, 3, 4), 1)]
        finally:
            engine.gate.set()
        assert [(await t).status_code for t in [first, *rest]] == [200] * 4
        assert [[s.seed for s in batch] for batch in engine.batches] == [[1], [2, 3, 4]]


@pytest.mark.parametrize("precision", ["fp4", "bf16"])
async def test_unedited_routes_file_takes_the_knobs_from_settings(request, precision, tmp_path):
    engine = PreloadedEngine(request.getfixturevalue(f"{precision}_engine"))
    app = create_app(make_settings(tmp_path, precision=precision, max_concurrent=5, max_queue_size=17), engine)
    async with serve(app) as http:
        stats = await queue_stats(http)
        assert (stats["max_concurrent"], stats["max_queue_size"]) == (5, 17)


def test_eta_scales_with_pixels_and_steps_not_with_the_last_job():
    from api.queue import Job, QueueManager
    from models.flux import ImageSpec

    queue = QueueManager(max_concurrent=2, max_queue_size=10)
    small = ImageSpec("a", 1, 512, 512, 4, 3.5)
    big = ImageSpec("b", 1, 1024, 1024, 28, 3.5)
    queue._record_success([Job(id="w-1", spec=small, deadline=0.0)], 0.5)
    assert queue.job_seconds(small) == pytest.approx(0.5)
    assert queue.job_seconds(big) == pytest.approx(0.5 * 4 * 7)  # 4x the pixels, 7x the steps
    running = Job(id="w-2", spec=big, deadline=0.0, step=14)
    assert queue.remaining_seconds(running) == pytest.approx(0.5 * 4 * 7 / 2)


def test_images_of_the_last_minute_count_batches_and_forget_old_ones():
    from api.queue import Job, QueueManager
    from models.flux import ImageSpec

    queue = QueueManager(max_concurrent=2, max_queue_size=10)
    spec = ImageSpec("a", 1, 512, 512, 4, 3.5)
    queue._record_success([Job(id="w-1", spec=spec, deadline=0.0), Job(id="w-2", spec=spec, deadline=0.0)], 1.0)
    queue._record_success([Job(id="w-3", spec=spec, deadline=0.0)], 0.5)
    assert queue.snapshot()["images_last_minute"] == 3
    later = queue.stats.finished_batches[-1][0] + 61
    assert queue.stats.images_last_minute(now=later) == 0
