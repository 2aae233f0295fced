"""monitoring/prometheus.yml and monitoring/grafana-dashboard.json against what a real worker exports: every
metric and label the dashboard queries must exist on /metrics, and the scrape config must cover ports 8000-8007."""
from __future__ import annotations

import json
import re

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.production.conftest import QUICK_JOB, ROOT

PROMETHEUS_YML = ROOT / "monitoring" / "prometheus.yml"
DASHBOARD = ROOT / "monitoring" / "grafana-dashboard.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def exported(worker) -> dict[str, set[str]]:
    """Sample names a worker can export, with their label names (families without samples included)."""
    worker.client.post("/generate", json=QUICK_JOB)  # so the histograms have samples
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(worker.client.get("/metrics").text):
        for suffix in SUFFIXES.get(family.type, ("",)):
            names.setdefault(family.name + suffix, set())
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


def test_scrape_config_covers_every_worker_port():
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["flux-workers"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert sorted(targets) == [f"127.0.0.1:{port}" for port in range(8000, 8008)]


def test_dashboard_is_valid_grafana_json_with_the_required_panels():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"], panel["title"]
    exprs = "\n".join(dashboard_exprs())
    for needle in ("flux_queue_depth", "rate(flux_images_generated_total",
                   "histogram_quantile(0.5, sum by (le, gpu, precision) (rate(flux_generation_seconds_bucket",
                   "histogram_quantile(0.95, sum by (le, gpu, precision) (rate(flux_generation_seconds_bucket",
                   "flux_gpu_memory_bytes", 'status=~"5.."'):
        assert needle in exprs, f"the dashboard has no panel using {needle}"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "gpu", "precision"} <= variables


def test_every_metric_and_label_the_dashboard_queries_exists(worker):
    names = exported(worker)
    for expr in dashboard_exprs():
        for metric in re.findall(r"\bflux_[a-z_]+", expr):
            assert metric in names, f"{metric} (in {expr}) is not exported by the worker"
            labels = set(re.findall(r"(\w+)\s*=~?\s*\"", expr))
            grouped = {label.strip() for group in re.findall(r"by \(([^)]*)\)", expr) for label in group.split(",")}
            known = names[metric] | {"gpu", "precision"}
            if metric.endswith("_bucket"):
                known.add("le")
            if names[metric]:  # a family with samples: its label names are known exactly
                assert (labels | grouped) <= known, f"{expr}: labels {(labels | grouped) - known} do not exist"
