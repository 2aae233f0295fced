"""Prometheus metrics of one worker, labelled by GPU and precision (prometheus-client, own registry)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120, 300)


class Metrics:
    def __init__(self, gpu: str, precision: str):
        self.registry = CollectorRegistry()
        labels = {"gpu": gpu, "precision": precision}
        self.labels = labels
        names = list(labels)
        r = self.registry
        self.requests = Counter("flux_http_requests", "HTTP requests by route and status",
                                names + ["route", "status"], registry=r)
        self.queue_depth = Gauge("flux_queue_depth", "jobs waiting", names, registry=r).labels(**labels)
        self.running = Gauge("flux_running", "images being generated now", names, registry=r).labels(**labels)
        self.queue_wait = Histogram("flux_queue_wait_seconds", "time from accept to start on the GPU", names,
                                    buckets=LATENCY_BUCKETS, registry=r).labels(**labels)
        self.generation = Histogram("flux_generation_seconds", "pipeline time of one batch", names + ["batch"],
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("flux_images_generated", "images generated", names, registry=r).labels(**labels)
        self.finished = Counter("flux_jobs_finished", "jobs finished by outcome", names + ["status", "code"],
                                registry=r)
        self.rejected = Counter("flux_requests_rejected", "requests refused before queueing, by reason",
                                names + ["reason"], registry=r)
        self.gpu_memory = Gauge("flux_gpu_memory_bytes", "GPU memory", names + ["kind"], registry=r)
        self.ready = Gauge("flux_ready", "1 when /health answers 200", names, registry=r).labels(**labels)

    def observe(self, event: str, data: dict) -> None:
        """The QueueManager's observer hook."""
        if event == "queued":
            self.queue_depth.set(data["depth"])
        elif event == "started":
            self.queue_wait.observe(data["queue_wait_s"])
        elif event == "generated":
            self.images.inc(data["images"])
            self.generation.labels(**self.labels, batch=str(data["batch"])).observe(data["seconds"])
        elif event == "finished":
            self.finished.labels(**self.labels, status=data["status"], code=data["code"]).inc()
        elif event == "rejected":
            self.rejected.labels(**self.labels, reason=data["reason"]).inc()

    def request(self, route: str, status: int) -> None:
        self.requests.labels(**self.labels, route=route, status=str(status)).inc()

    def render(self, snapshot: dict, memory: dict, ready: bool) -> bytes:
        self.queue_depth.set(snapshot.get("queued", 0))
        self.running.set(snapshot.get("running", 0))
        self.ready.set(1 if ready else 0)
        for kind in ("used", "total"):
            value = memory.get(f"gpu_memory_{kind}_mb")
            if value is not None:
                self.gpu_memory.labels(**self.labels, kind=kind).set(value * 2**20)
        return generate_latest(self.registry)
