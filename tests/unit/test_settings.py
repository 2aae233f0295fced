"""Settings: one object from the environment; the port from the guide's per-precision variable."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from api.settings import Settings, load_settings


def test_defaults_match_the_issue():
    settings = load_settings("bf16", environ={})
    assert settings.max_concurrent == 2
    assert settings.max_queue_size == 100
    assert settings.output_dir == "outputs"
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.model == "black-forest-labs/FLUX.1-schnell"
    assert settings.device == "auto"
    assert settings.gpu_index is None


@pytest.mark.parametrize("precision, variable", [("fp4", "FP4_API_PORT"), ("bf16", "BF16_API_PORT")])
def test_port_comes_from_the_precision_variable(precision, variable):
    settings = load_settings(precision, environ={variable: "8003"})
    assert settings.port == 8003
    assert settings.precision == precision


def test_each_entry_point_reads_only_its_own_port_variable():
    environ = {"FP4_API_PORT": "8004", "BF16_API_PORT": "8005"}
    assert load_settings("fp4", environ=environ).port == 8004
    assert load_settings("bf16", environ=environ).port == 8005
    assert load_settings("bf16", environ={"FP4_API_PORT": "8004"}).port == 8000


def test_flux_port_is_accepted_for_any_precision():
    assert load_settings("fp4", environ={"FLUX_PORT": "8100"}).port == 8100


def test_flux_variables_are_read_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FLUX_MODEL", "dummy:tiny")
    monkeypatch.setenv("FLUX_DEVICE", "cpu")
    monkeypatch.setenv("FLUX_MAX_CONCURRENT", "3")
    monkeypatch.setenv("FLUX_MAX_QUEUE_SIZE", "200")
    monkeypatch.setenv("FLUX_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("FLUX_HOST", "0.0.0.0")
    monkeypatch.setenv("FP4_API_PORT", "8006")
    settings = load_settings("fp4")
    assert (settings.model, settings.device) == ("dummy:tiny", "cpu")
    assert (settings.max_concurrent, settings.max_queue_size) == (3, 200)
    assert settings.output_dir == str(tmp_path)
    assert settings.host == "0.0.0.0"
    assert settings.port == 8006


def test_the_entry_point_decides_the_precision(monkeypatch):
    monkeypatch.setenv("FLUX_PRECISION", "bf16")
    assert load_settings("fp4").precision == "fp4"


def test_gpu_index_is_the_first_visible_device():
    assert load_settings("bf16", environ={"CUDA_VISIBLE_DEVICES": "3,4"}).gpu_index == 3
    assert load_settings("bf16", environ={"CUDA_VISIBLE_DEVICES": "GPU-1234abcd"}).gpu_index is None


@pytest.mark.parametrize("variable, value", [
    ("FLUX_MAX_CONCURRENT", "0"),
    ("FLUX_MAX_QUEUE_SIZE", "-1"),
    ("FLUX_DEVICE", "tpu"),
    ("FLUX_MAX_CONCURRENT", "two"),
])
def test_invalid_values_are_refused_at_start_up(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as caught:
        load_settings("bf16")
    assert variable.removeprefix("FLUX_").lower() in str(caught.value)


def test_an_invalid_port_is_refused():
    with pytest.raises(ValidationError):
        load_settings("fp4", environ={"FP4_API_PORT": "70000"})


def test_warmup_sizes_are_parsed():
    assert Settings(warmup_sizes="512x512, 1024x768,256").warmup_size_list == [(512, 512), (1024, 768), (256, 256)]


def test_tuning_knobs_reach_the_engine(monkeypatch):
    from api.app import build_engine

    monkeypatch.setenv("FLUX_ATTENTION_BACKEND", "_native_cudnn")
    monkeypatch.setenv("FLUX_COMPILE_MODE", "max-autotune-no-cudagraphs")
    monkeypatch.setenv("FLUX_FP4_QUANT_TYPE", "nf4")
    config = build_engine(load_settings("fp4")).config
    assert config.attention_backend == "_native_cudnn"
    assert config.compile_mode == "max-autotune-no-cudagraphs"
    assert config.fp4_quant_type == "nf4"
    monkeypatch.delenv("FLUX_COMPILE_MODE")
    assert build_engine(load_settings("fp4")).config.compile_mode is None  # empty: torch's default mode
