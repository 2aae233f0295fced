"""Shared fixtures: one loaded dummy:tiny engine per precision for the whole run.

Importing diffusers and building a pipeline costs seconds; generating a 256x256 image costs a tenth of one.
So each precision is loaded once, and every in-process app gets a `PreloadedEngine` over it
(see tests/unit/support.py): the real FluxPipeline and the real generate path, without a second load.
"""
from __future__ import annotations

import os

import pytest

ENV_PREFIXES = ("FLUX_", "BF16_API_PORT", "FP4_API_PORT", "FP8_API_PORT", "CUDA_VISIBLE_DEVICES")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Settings read the environment: a developer's FLUX_* variables must not leak into the tests."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def anyio_backend():
    return "asyncio"


def _load_engine(precision: str):
    from models.flux import EngineConfig, FluxEngine

    engine = FluxEngine(EngineConfig(model="dummy:tiny", precision=precision, device="cpu",
                                     warmup_sizes=((256, 256),), warmup_steps=1))
    engine.load()
    engine.warmup()
    return engine


@pytest.fixture(scope="session")
def bf16_engine():
    return _load_engine("bf16")


@pytest.fixture(scope="session")
def fp4_engine():
    return _load_engine("fp4")
