"""GPU utilisation on /queue-stats: null without a GPU, nvidia-smi's GPU-Util figure with one."""
from __future__ import annotations

import sys
import types
from dataclasses import replace

import pytest

from api.app import create_app
from api.runtime import Runtime
from tests.unit.support import PreloadedEngine, make_settings, queue_stats, serve

pytestmark = pytest.mark.anyio


async def test_queue_stats_has_a_null_gpu_utilization_on_cpu(bf16_engine, tmp_path):
    app = create_app(make_settings(tmp_path), PreloadedEngine(bf16_engine))
    async with serve(app) as http:
        stats = await queue_stats(http)
    assert "gpu_utilization_pct" in stats
    assert stats["gpu_utilization_pct"] is None


def test_gpu_utilization_comes_from_nvml_on_a_gpu(bf16_engine, tmp_path, monkeypatch):
    # No GPU on the test machine: nvml is the one part stood in for, to check what is read from it.
    nvml = types.SimpleNamespace(
        NVMLError=NVMLError,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 * 2**30, total=80 * 2**30),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=87, memory=40),
    )
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    rt = Runtime(make_settings(tmp_path), PreloadedEngine(bf16_engine))
    rt.info = replace(bf16_engine.info, device="cuda:0")
    rt._nvml_handle = object()
    out = rt.gpu_memory()
    assert out["gpu_utilization_pct"] == 87
    assert out["gpu_memory_used_mb"] == 3072.0

    # a MIG slice has no utilisation counter: the memory figures stay
    def not_supported(handle):
        raise NVMLError("Not Supported")

    nvml.nvmlDeviceGetUtilizationRates = not_supported
    out = rt.gpu_memory()
    assert out["gpu_utilization_pct"] is None
    assert out["gpu_memory_total_mb"] == 81920.0


class NVMLError(Exception):
    pass
