"""The portable compile cache a fleet shares: one process compiles and writes the artifacts file
(torch.compiler.save_cache_artifacts, what `prepare` does); a process on another machine, whose cache folder
holds nothing but a copy of that file, loads it and compiles nothing.

Compile is GPU-only in the service; here inductor compiles the real dummy:tiny blocks for the CPU through the
engine's test-only compile_backend, which takes the same load/save path as a GPU worker.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

START = """
import json, sys, time
from torch._dynamo.utils import counters
from models.flux import EngineConfig, FluxEngine
cache, save = sys.argv[1], sys.argv[2] == "save"
engine = FluxEngine(EngineConfig(model="dummy:tiny", device="cpu", compile=True, compile_backend="inductor",
                                 compile_cache_dir=cache, warmup_sizes=((256, 256),), warmup_steps=1))
started = time.perf_counter()
info = engine.load()
engine.warmup()
took = time.perf_counter() - started
saved = engine.save_compile_artifacts() if save else None
print(json.dumps({"compiled": info.compiled, "s": took, "saved": saved,
                  "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"]}))
"""


def start(cache: Path, save: bool, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLUX_", "TORCHINDUCTOR_"))}
    # Each "machine" has only its own folders: nothing else on this host may satisfy the cache.
    env.update(OMP_NUM_THREADS="1", TRITON_CACHE_DIR=str(tmp_path / f"triton-{cache.name}"),
               TORCHINDUCTOR_CACHE_DIR=str(cache))
    done = subprocess.run([sys.executable, "-c", START, str(cache), "save" if save else "load"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU backend needs a C++ compiler")
@pytest.mark.slow
@pytest.mark.timeout(900)  # two inductor compiles of the tiny blocks on a shared 2-core machine
def test_a_second_machine_loads_the_artifacts_file_and_compiles_nothing(tmp_path):
    first_cache, second_cache = tmp_path / "first", tmp_path / "second"
    first = start(first_cache, save=True, tmp_path=tmp_path)
    assert first["compiled"] and first["misses"] > 0 and first["hits"] == 0, first
    artifacts = Path(first["saved"])
    assert artifacts.parent == first_cache and artifacts.stat().st_size > 0
    second_cache.mkdir()
    shutil.copy2(artifacts, second_cache / artifacts.name)  # the one file a Docker image or a copy carries
    second = start(second_cache, save=False, tmp_path=tmp_path)
    assert second["compiled"] and second["misses"] == 0 and second["hits"] == first["misses"], (first, second)
