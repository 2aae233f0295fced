"""GET /metrics in Prometheus text format: requests by route and status (ids folded), queue depth, running,
queue-wait and generation histograms, images, finished jobs, GPU memory; every series labelled by GPU and
precision."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.production.conftest import QUICK_JOB, submit_job, wait_job

LABELS = {"gpu": "1", "precision": "bf16"}  # the shared worker runs with FLUX_GPU_INDEX=1
KNOWN_ROUTES = {"/", "/generate", "/jobs", "/jobs/{id}", "/jobs/{id}/events", "/health", "/live", "/queue-stats",
                "/metrics", "/images", "/v1/images/generations", "/generate/fast", "/generate/quality", "other"}


def scrape(worker) -> dict:
    resp = worker.client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {family.name: family for family in text_string_to_metric_families(resp.text)}


def value(families: dict, family: str, sample: str, **labels) -> float:
    total = 0.0
    for s in families[family].samples if family in families else ():
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            total += s.value
    return total


def test_metrics_count_requests_jobs_and_images(idle_worker):
    w = idle_worker
    before = scrape(w)
    assert w.client.post("/generate", json=QUICK_JOB).status_code == 200
    assert w.client.post("/generate", json={"prompt": 1}).status_code == 422
    assert w.client.get("/jobs/8000-deadbeefdeadbeefdeadbeef").status_code == 404
    job_id = submit_job(w, QUICK_JOB)
    wait_job(w, job_id, lambda v: v["status"] == "succeeded", 30, "the job to succeed")
    after = scrape(w)

    def delta(family, sample, **labels):
        return value(after, family, sample, **labels) - value(before, family, sample, **labels)

    assert delta("flux_http_requests", "flux_http_requests_total", route="/generate", status="200") == 1
    assert delta("flux_http_requests", "flux_http_requests_total", route="/generate", status="422") == 1
    assert delta("flux_http_requests", "flux_http_requests_total", route="/jobs", status="202") == 1
    assert delta("flux_http_requests", "flux_http_requests_total", route="/jobs/{id}", status="404") == 1
    assert delta("flux_images_generated", "flux_images_generated_total") == 2
    assert delta("flux_jobs_finished", "flux_jobs_finished_total", status="succeeded", code="ok") == 2
    assert delta("flux_queue_wait_seconds", "flux_queue_wait_seconds_count") == 2
    assert delta("flux_generation_seconds", "flux_generation_seconds_count") == 2
    assert delta("flux_generation_seconds", "flux_generation_seconds_sum") > 0

    routes = {s.labels["route"] for s in after["flux_http_requests"].samples}
    assert routes <= KNOWN_ROUTES, f"unbounded route labels (ids must be folded): {routes - KNOWN_ROUTES}"


def test_every_series_carries_gpu_and_precision_labels(worker):
    families = scrape(worker)
    flux = {name: f for name, f in families.items() if name.startswith("flux_")}
    for name in ("flux_http_requests", "flux_queue_depth", "flux_running", "flux_queue_wait_seconds",
                 "flux_generation_seconds", "flux_images_generated", "flux_jobs_finished", "flux_requests_rejected",
                 "flux_gpu_memory_bytes", "flux_ready"):
        assert name in flux, f"{name} is not exported"
    for family in flux.values():
        for sample in family.samples:
            assert {k: sample.labels.get(k) for k in LABELS} == LABELS, (sample.name, sample.labels)


def test_gauges_follow_the_queue(worker):
    families = scrape(worker)
    stats = worker.stats()
    assert value(families, "flux_queue_depth", "flux_queue_depth") == stats["queued"]
    assert value(families, "flux_running", "flux_running") == stats["running"]
    assert value(families, "flux_ready", "flux_ready") == 1


def test_histograms_are_cumulative_and_end_at_their_count(worker):
    worker.client.post("/generate", json=QUICK_JOB)
    families = scrape(worker)
    for name in ("flux_queue_wait_seconds", "flux_generation_seconds"):
        series: dict[tuple, list] = {}
        counts = {}
        for s in families[name].samples:
            key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            if s.name.endswith("_bucket"):
                series.setdefault(key, []).append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_count"):
                counts[key] = s.value
        assert series, f"{name} has no buckets"
        for key, buckets in series.items():
            buckets.sort()
            values = [v for _, v in buckets]
            assert values == sorted(values), f"{name}{key} buckets are not cumulative"
            assert buckets[-1][0] == float("inf") and values[-1] == counts[key] > 0
            assert any(le <= 0.25 for le, _ in buckets), "no bucket resolves sub-second CPU/H100 latencies"
