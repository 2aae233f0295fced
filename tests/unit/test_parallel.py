"""Latency-mode settings and refusals (models/parallel.py): what is decided before any process starts."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from api.app import build_engine
from api.settings import load_settings
from models.flux import ImageSpec
from models.parallel import ParallelEngine, UnsplittableSize


def spec(width: int, height: int) -> ImageSpec:
    return ImageSpec(prompt="p", seed=1, width=width, height=height, steps=2, guidance=3.5)


def test_the_group_size_comes_from_the_visible_gpus_unless_given(monkeypatch):
    plain = load_settings("bf16", environ={})
    assert (plain.parallel, plain.gpus_per_worker, plain.parallel_world_size) == ("off", 1, 1)
    # several visible GPUs alone change nothing: only FLUX_PARALLEL turns the group on
    assert load_settings("bf16", environ={"CUDA_VISIBLE_DEVICES": "2,3"}).parallel_world_size == 1
    monkeypatch.setenv("FLUX_PARALLEL", "ulysses")
    grouped = load_settings("bf16", environ={"CUDA_VISIBLE_DEVICES": "2,3"})
    assert (grouped.gpus_per_worker, grouped.parallel_world_size, grouped.gpu_index) == (2, 2, 2)
    monkeypatch.setenv("FLUX_GPUS_PER_WORKER", "4")
    assert load_settings("bf16", environ={"CUDA_VISIBLE_DEVICES": "2,3", "FLUX_GPUS_PER_WORKER": "4"}) \
        .parallel_world_size == 4
    monkeypatch.setenv("FLUX_PARALLEL", "tensor")
    with pytest.raises(ValidationError, match="parallel"):
        load_settings("bf16", environ={})


def test_a_cpu_refuses_the_nccl_group_with_a_clear_message_before_starting_anything(monkeypatch):
    monkeypatch.setenv("FLUX_PARALLEL", "ulysses")
    monkeypatch.setenv("FLUX_DEVICE", "cpu")
    monkeypatch.setenv("FLUX_MODEL", "dummy:tiny")
    monkeypatch.setenv("FLUX_GPUS_PER_WORKER", "2")
    engine = build_engine(load_settings("bf16", environ={"FLUX_GPUS_PER_WORKER": "2"}))
    assert isinstance(engine, ParallelEngine)
    with pytest.raises(RuntimeError, match="through NCCL, and no CUDA GPU is available"):
        engine.load()
    assert engine.follower_pids() == [] and engine.pipe is None


def test_a_group_of_one_is_refused(monkeypatch):
    monkeypatch.setenv("FLUX_PARALLEL", "ring")
    monkeypatch.setenv("FLUX_DEVICE", "cpu")
    monkeypatch.setenv("FLUX_PARALLEL_BACKEND", "gloo")
    engine = build_engine(load_settings("bf16", environ={}))
    with pytest.raises(ValueError, match="at least 2 GPUs per worker"):
        engine.load()


@pytest.mark.parametrize("world, width, height, ok", [
    (2, 256, 256, True), (2, 272, 256, True), (2, 272, 272, False), (4, 272, 272, False), (4, 272, 256, True),
    (4, 1024, 1024, True), (8, 1008, 1008, False)])
def test_sizes_whose_tokens_do_not_split_across_the_group_are_client_errors(world, width, height, ok, monkeypatch):
    monkeypatch.setenv("FLUX_PARALLEL", "ulysses")
    monkeypatch.setenv("FLUX_GPUS_PER_WORKER", str(world))
    engine = build_engine(load_settings("bf16", environ={"FLUX_GPUS_PER_WORKER": str(world)}))
    if ok:
        engine.check_spec(spec(width, height))
    else:
        with pytest.raises(UnsplittableSize, match=f"multiple of {world}") as err:
            engine.check_spec(spec(width, height))
        assert err.value.field == "width"
