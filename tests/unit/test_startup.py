"""Start-up of a worker: warm-up progress (engine and /health), timings remembered for the next start, the
compile lock that lets workers starting together compile once, and `python -m api.prepare` on a CPU."""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from api.app import create_app
from models.flux import FluxEngine
from tests.unit.support import GatedEngine, PreloadedEngine, make_settings, serve, wait_for_state, wait_until

ROOT = Path(__file__).resolve().parents[2]


class WarmingEngine(PreloadedEngine):
    """The shared tiny pipeline with the engine's real warm-up, its own config and a record of progress()
    as each warm-up call starts."""

    warmup = FluxEngine.warmup

    def __init__(self, loaded: FluxEngine, cache_dir, **config):
        super().__init__(loaded)
        options = dict(compile_cache_dir=str(cache_dir), warmup_steps=1, warmup_sizes=((256, 256), (256, 128)),
                       warmup_batch=2)
        options.update(config)
        self.config = dataclasses.replace(loaded.config, **options)
        self.seen: list[dict] = []

    def generate(self, specs, should_stop=None):
        self.seen.append(self.progress())
        return super().generate(specs, should_stop)


def test_warmup_reports_each_item_and_the_next_start_knows_how_long_each_took(bf16_engine, tmp_path):
    first = WarmingEngine(bf16_engine, tmp_path)
    first.warmup()
    assert [(p["phase"], p["item"], p["done"], p["total"]) for p in first.seen] == [
        ("warmup", "256x256", 0, 3), ("warmup", "256x128", 1, 3), ("warmup", "256x128 batch 2", 2, 3)]
    assert all(p["expected_s"] is None and p["elapsed_s"] >= 0 for p in first.seen)
    done = first.progress()
    assert done["phase"] == "ready" and (done["done"], done["total"]) == (3, 3)
    took = done["items_s"]
    assert set(took) == {"256x256", "256x128", "256x128 batch 2"}
    second = WarmingEngine(bf16_engine, tmp_path)
    second.warmup()
    assert [p["expected_s"] for p in second.seen] == [took["256x256"], took["256x128"], took["256x128 batch 2"]]
    other = WarmingEngine(bf16_engine, tmp_path, warmup_steps=2)  # other settings: no estimate from the first
    other.warmup()
    assert [p["expected_s"] for p in other.seen] == [None, None, None]


def test_an_unreadable_timings_file_only_loses_the_estimate(bf16_engine, tmp_path):
    (tmp_path / "warmup-times.json").write_text("{not json")
    engine = WarmingEngine(bf16_engine, tmp_path)
    engine.warmup()
    assert engine.progress()["phase"] == "ready"
    assert json.loads((tmp_path / "warmup-times.json").read_text())  # rewritten


def test_a_compiling_worker_waits_for_the_one_already_compiling(bf16_engine, tmp_path):
    engine = WarmingEngine(bf16_engine, tmp_path)
    engine.info = dataclasses.replace(engine.info, compiled=True)  # what a GPU worker with compile on has
    with open(tmp_path / "compile.lock", "a+") as other:  # another worker holds the first compile
        fcntl.flock(other, fcntl.LOCK_EX)
        worker = threading.Thread(target=engine.warmup)
        worker.start()
        poll(lambda: engine.progress().get("phase") == "waiting")
        assert engine.seen == [] and engine.batches == []
        fcntl.flock(other, fcntl.LOCK_UN)
        worker.join(60)
    assert not worker.is_alive() and len(engine.batches) == 3
    # once a warm-up is on record nobody waits: a held lock no longer blocks the next start
    again = WarmingEngine(bf16_engine, tmp_path)
    again.info = engine.info
    with open(tmp_path / "compile.lock", "a+") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        again.warmup()
    assert len(again.batches) == 3



@pytest.mark.anyio
async def test_health_shows_the_warmup_progress_while_loading(bf16_engine, tmp_path):
    engine = GatedEngine(bf16_engine, closed=True)
    engine.warmup = FluxEngine.warmup.__get__(engine)
    engine.config = dataclasses.replace(bf16_engine.config, compile_cache_dir=str(tmp_path / "cache"),
                                        warmup_sizes=((256, 256),), warmup_steps=1)
    app = create_app(make_settings(tmp_path, max_concurrent=1), engine)
    async with serve(app, ready=False) as http:
        try:
            await wait_until(engine.entered.is_set, timeout=20)
            health = await http.get("/health")
            assert health.status_code == 503
            body = health.json()
            assert body["status"] == "loading"
            progress = body["progress"]
            assert (progress["phase"], progress["item"], progress["done"], progress["total"]) == \
                ("warmup", "256x256", 0, 1)
            assert progress["elapsed_s"] >= progress["item_elapsed_s"] >= 0 and progress["expected_s"] is None
        finally:
            engine.gate.set()
        await wait_for_state(http, "ready")
        assert "progress" not in (await http.get("/health")).json()


def poll(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_prepare_on_a_cpu_warms_up_records_timings_and_says_nothing_was_compiled(tmp_path):
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_")}
    env.update(FLUX_MODEL="dummy:tiny", FLUX_DEVICE="cpu", FLUX_COMPILE_CACHE_DIR=str(cache), NUM_GPUS="1",
               FLUX_WARMUP_SIZES="256x256", FLUX_WARMUP_STEPS="1", FLUX_MAX_CONCURRENT="1",
               FLUX_PYTHON=sys.executable, FLUX_RUN_DIR=str(tmp_path / "run"), FLUX_LOG_DIR=str(tmp_path / "logs"),
               FLUX_OUTPUT_DIR=str(tmp_path / "out"), OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", str(ROOT / "start_multi_gpu.sh"), "prepare", "-m", "bf16"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "compile is GPU-only" in done.stdout and "preparing bf16" in done.stdout
    timings = json.loads((cache / "warmup-times.json").read_text())
    assert [list(v) for v in timings.values()] == [["256x256"]]
    bad = subprocess.run([sys.executable, "-m", "api.prepare", "fp16"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_an_unwritable_cache_folder_costs_only_the_lock_and_the_estimate(bf16_engine, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    engine = WarmingEngine(bf16_engine, blocker / "cache")
    engine.info = dataclasses.replace(engine.info, compiled=True)
    engine.warmup()
    assert len(engine.batches) == 3 and engine.progress()["phase"] == "ready"
