"""The benchmark harness runs end to end on a CPU: `bench.raw --smoke` and `bench.http --smoke` (which starts
a real dummy:tiny worker on a free port) write results with every field the records need, and the suite
and record tools turn them into tables. This tests the harness, not speed: no figure is compared to a target.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import flops, record, suite
from models import dummy

REPO = Path(__file__).resolve().parents[2]
VERSION_KEYS = {"torch", "diffusers", "transformers", "bitsandbytes", "torchao"}


def run_module(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def check_header(doc: dict, kind: str, module: str) -> None:
    assert doc["kind"] == kind
    assert doc["card"] == "cpu"
    assert doc["date"] and doc["stamp"]
    assert VERSION_KEYS <= set(doc["versions"]) and doc["versions"]["torch"]
    assert doc["command"].startswith(f"python -m {module} --smoke")


@pytest.fixture(scope="module")
def raw_result(tmp_path_factory) -> tuple[dict, str]:
    path = tmp_path_factory.mktemp("bench") / "raw.json"
    proc = run_module(["bench.raw", "--smoke", "--json", str(path)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(path.read_text()), proc.stdout


@pytest.fixture(scope="module")
def http_result(tmp_path_factory, raw_result) -> tuple[dict, str]:
    folder = tmp_path_factory.mktemp("bench")
    (folder / "raw.json").write_text(json.dumps(raw_result[0]))
    proc = run_module(["bench.http", "--smoke", "--raw-baseline", str(folder / "raw.json"),
                       "--json", str(folder / "http.json")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((folder / "http.json").read_text()), proc.stdout


def test_raw_smoke_writes_every_figure(raw_result):
    doc, stdout = raw_result
    check_header(doc, "bench.raw", "bench.raw")
    assert doc["config"]["model"] == "dummy:tiny" and doc["load_s"] > 0
    assert doc["flop_model"]["attention_blocks"] == 2 and doc["errors"] == []
    assert [(r["width"], r["steps"], r["batch"]) for r in doc["results"]] == [(256, 2, 1), (256, 2, 2)]
    for row in doc["results"]:
        assert len(row["times_s"]) == 2 and len(row["warmup_s"]) == 1
        assert row["median_s"] > 0 and row["s_per_img"] == pytest.approx(row["median_s"] / row["batch"], rel=1e-2)
        assert row["img_per_s"] > 0 and row["tflops"] > 0 and row["tflop_per_img"] > 0
        phases = row["phases"]
        assert phases["denoise_calls"] == 2 and phases["denoise"] > 0 and phases["vae_decode"] > 0
        assert phases["text_encode"] > 0
    # the table comes last
    assert "median s" in stdout and stdout.rstrip().splitlines()[-1].lstrip().startswith("256x256/2")


def test_http_smoke_measures_levels_workers_and_ratio(http_result):
    doc, stdout = http_result
    check_header(doc, "bench.http", "bench.http")
    assert [lvl["load"] for lvl in doc["levels"]] == ["c=1", "c=2", "4/s"]
    for lvl in doc["levels"]:
        assert lvl["sent"] == lvl["ok"] == 4 and lvl["errors_total"] == 0 and lvl["errors"] == {}
        assert lvl["img_per_s"] > 0 and lvl["s_per_img"] > 0
        assert {"p50", "p95", "p99"} <= set(lvl["latency_s"])
        assert sum(lvl["per_worker"].values()) == 4 and "unknown" not in lvl["per_worker"]
        assert lvl["generate_ms_p50"] > 0 and lvl["tflops_per_gpu"] > 0
        assert lvl["e2e_raw_ratio"] > 0 and lvl["vs_best_batch"] > 0
    assert doc["config"]["model"] == "dummy:tiny" and doc["config"]["steps"] == 2
    assert doc["raw_baseline"]["bs1_img_per_s"] > 0 and doc["flop_per_image"] > 0
    assert doc["stacks"][0]["ready_s"] > 0 and doc["errors"] == []
    assert "e2e/raw" in stdout


def test_suite_and_record_render_the_results(raw_result, http_result, tmp_path):
    raw_path, http_path = tmp_path / "raw.json", tmp_path / "http.json"
    raw_path.write_text(json.dumps(raw_result[0]))
    http_path.write_text(json.dumps(http_result[0]))
    status = tmp_path / "status.tsv"
    status.write_text(f"raw-bf16\tok\t12\t{raw_path}\t\nhttp-bf16\tok\t30\t{http_path}\t\n"
                      "raw-fp8-compile\tskipped\t0\t-\tfp8: no (no CUDA device)\n")
    suite_path = tmp_path / "suite.json"
    assert suite.main(["--status", str(status), "--out", str(suite_path), "--quiet"]) == 0
    doc = json.loads(suite_path.read_text())
    assert doc["kind"] == "bench.suite" and doc["card"] == "cpu"
    assert [i["status"] for i in doc["items"]] == ["ok", "ok", "skipped"]
    table = suite.render(doc)
    assert "raw-fp8-compile" in table and "256x256/2 bs1" in table

    bench_doc = tmp_path / "BENCHMARKS.md"
    assert record.main([str(raw_path), str(suite_path), "--doc", str(bench_doc), "--note", "harness test"]) == 0
    text = bench_doc.read_text()
    assert text.startswith("# Benchmarks")
    assert text.count("\n## ") == 2 and "- card: cpu" in text and "- versions: torch " in text
    assert "- command: `python -m bench.raw --smoke" in text and "| case | bs | median s |" in text
    assert "### http-bf16 (ok, 30 s)" in text


def test_flop_model_matches_the_published_limit():
    """PERF.md: FLUX.1-dev at 1024² is ~74 TFLOP per step (59 linear + 15 attention), ~2.08 PFLOP for 28."""
    spec = dummy.dummy_spec("dummy:flux.1-dev")
    shape = flops.shape_from_config(spec.transformer)
    assert shape.per_token_params == pytest.approx(6.44e9, rel=0.01)
    step = flops.flop_per_step(shape, 1024, 1024, spec.max_sequence_length)
    assert step["image_tokens"] == 4096
    assert step["linear"] == pytest.approx(59e12, rel=0.02)
    assert step["attention"] == pytest.approx(15e12, rel=0.02)
    assert flops.flop_per_image(shape, 1024, 1024, 28, 512) == pytest.approx(2.08e15, rel=0.01)
    assert flops.flop_per_image(shape, 512, 512, 28, 512) == pytest.approx(0.6e15, rel=0.01)


def test_attention_bench_says_it_needs_a_gpu_on_a_cpu():
    done = run_module(["bench.attention"], timeout=120)
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stderr


def test_encode_bench_times_every_format_on_both_images(tmp_path):
    out = tmp_path / "encode.json"
    done = run_module(["bench.encode", "--size", "64", "--runs", "1", "--json", str(out)], timeout=120)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["results"]
    assert {(r["image"], r["format"]) for r in rows} == {
        (image, fmt) for image in ("random pixels", "gradient")
        for fmt in ("png (served)", "png Pillow 1", "png level 6", "jpeg", "webp")}
    assert all(r["ms"] >= 0 and r["kib"] >= 0 for r in rows)


def test_lora_bench_smoke_measures_every_figure(tmp_path):
    out = tmp_path / "lora.json"
    done = run_module(["bench.lora", "--smoke", "--json", str(out)], timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(out.read_text())
    check_header(doc, "bench.lora", "bench.lora")
    assert doc["config"]["model"] == "dummy:tiny" and doc["errors"] == []
    assert [r["rank"] for r in doc["results"]] == [4, 8]
    for row in doc["results"]:
        assert row["base_s"] > 0 and row["first_use_s"] > 0 and row["switch_s"] > 0 and row["image_s"] > 0
    assert doc["compiles_after_ready"] == 0
    assert doc["lora_stats"]["misses"] >= 4 and doc["lora_stats"]["hits"] > 0
