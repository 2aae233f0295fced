"""Helpers for tests that drive a worker's job API and read its output folder."""
from __future__ import annotations

import json
from pathlib import Path

from tests.harness.waiting import wait_until

# A job that would run for about 15 s at 1024x1024 on the CPU (~0.15 s a step): long enough to
# watch it run and to cancel it, and cheap when cancelled after a few steps.
LONG_JOB = {"prompt": "a long render", "width": 1024, "height": 1024, "num_inference_steps": 100, "seed": 1}
QUICK_JOB = {"prompt": "a quick render", "width": 256, "height": 256, "num_inference_steps": 1}


def submit_job(worker, body: dict, **kwargs) -> str:
    """POST /jobs, remember the id for clean-up; returns the job id."""
    resp = worker.client.post("/jobs", json=body, **kwargs)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    worker.open_jobs.append(job_id)
    return job_id


def job_state(worker, job_id: str) -> dict:
    resp = worker.client.get(f"/jobs/{job_id}")
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_job(worker, job_id: str, predicate, timeout: float = 60, what: str = "job state"):
    holder = {}

    def check():
        holder["view"] = job_state(worker, job_id)
        return predicate(holder["view"])

    wait_until(check, timeout, 0.05, what)
    return holder["view"]


def image_files(folder: Path) -> list[str]:
    """Every entry in an output folder, temp files included (a partial write would show here)."""
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def sse_events(lines) -> list[tuple[str, dict]]:
    """Parse text/event-stream lines into (event, data) pairs."""
    events, name, data = [], None, []
    for line in lines:
        if line == "":
            if name is not None or data:
                events.append((name or "message", json.loads("\n".join(data)) if data else {}))
            name, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    return events
