"""Latency mode (models/parallel.py) with real processes on a CPU: a worker whose group is two processes.

diffusers' context parallelism runs on the CPU over gloo (Ulysses; ring needs a GPU attention kernel), so these
tests drive the real thing: rank 0 is main_bf16.py, it spawns its follower, both load dummy:tiny and split every
image's tokens between them. What is checked is what only a group can get wrong: the image equals the one-process
render, a size whose tokens do not split is a 4xx, a cancelled render leaves the group in step, and a dead rank
takes the group down (exit, never a hang) whichever rank dies.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.clients import wait_for
from tests.ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120
QUICK = {"prompt": "a paper boat", "width": 256, "height": 256, "num_inference_steps": 2, "seed": 5}


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) is gone for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def start_group(tmp: Path, **extra: str) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLUX_", "BF16_", "FP4_", "FP8_"))}
    env.update({
        "BF16_API_PORT": str(port), "FLUX_MODEL": "dummy:tiny", "FLUX_DEVICE": "cpu",
        "FLUX_PARALLEL": "ulysses", "FLUX_GPUS_PER_WORKER": "2", "FLUX_PARALLEL_BACKEND": "gloo",
        "FLUX_PARALLEL_TIMEOUT_S": "60", "FLUX_OUTPUT_DIR": str(tmp / "images"), "FLUX_WARMUP_SIZES": "256x256",
        "FLUX_WARMUP_STEPS": "1", "FLUX_MAX_CONCURRENT": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1", **extra,
    })
    log = tmp / f"worker-{port}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "main_bf16.py"], cwd=ROOT, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, port, log


def wait_ready(proc: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"worker exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"group not ready after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def test_group_renders_the_one_process_image_refuses_unsplittable_sizes_cancels_in_step_and_dies_with_rank0(
        tmp_path, bf16_engine):
    from models.flux import ImageSpec

    proc, port, log = start_group(tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, port, log)
        followers = children(proc.pid)
        assert len(followers) == 1, followers  # one follower for a group of two
        notes = httpx.get(f"{url}/").json()["notes"]
        assert any(n.startswith("context parallel: ulysses over 2 CPU processes (gloo") for n in notes), notes

        # the same image as one process renders (float32 on a CPU: the split attention rounds differently)
        response = httpx.post(f"{url}/generate", json=QUICK, timeout=60)
        assert response.status_code == 200, response.text
        served = np.asarray(Image.open(BytesIO(httpx.get(response.json()["image_url"]).content)).convert("RGB"),
                            dtype=np.int16)
        spec = ImageSpec(prompt=QUICK["prompt"], seed=QUICK["seed"], width=256, height=256, steps=2,
                         guidance=3.5)
        alone = np.asarray(bf16_engine.generate([spec])[0].convert("RGB"), dtype=np.int16)
        assert np.abs(served - alone).max() <= 2

        # 272x272 is 17x17 tokens: they cannot split across two ranks, so the worker says so (and stays up)
        odd = httpx.post(f"{url}/generate", json=dict(QUICK, width=272, height=272), timeout=30)
        assert odd.status_code == 422, odd.text
        assert odd.json()["error"]["field"] == "width" and "multiple of 32" in odd.json()["error"]["message"]

        # a job cancelled mid-render stops on every rank at the same step: the next render still works
        job = httpx.post(f"{url}/jobs", json=dict(QUICK, width=512, height=512, num_inference_steps=50),
                         timeout=30).json()
        wait_for(lambda: httpx.get(f"{url}/jobs/{job['job_id']}").json().get("step", 0) >= 1, timeout=60)
        cancelled = httpx.delete(f"{url}/jobs/{job['job_id']}", timeout=60).json()
        assert cancelled["status"] == "cancelled", cancelled
        again = httpx.post(f"{url}/generate", json=dict(QUICK, seed=6), timeout=60)
        assert again.status_code == 200, again.text
        assert httpx.get(f"{url}/health").json()["status"] == "ready"

        # rank 0 dies mid-render, without a word: its follower, inside the collectives of that render, notices
        # (its pipe from rank 0 closes) and exits by itself instead of waiting for the collective timeout
        job = httpx.post(f"{url}/jobs", json=dict(QUICK, width=512, height=512, num_inference_steps=50),
                         timeout=30).json()
        wait_for(lambda: httpx.get(f"{url}/jobs/{job['job_id']}").json().get("step", 0) >= 1, timeout=60)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert wait_for(lambda: not alive(followers[0]), timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_a_follower_dying_mid_render_takes_the_group_down_for_a_restart(tmp_path):
    proc, port, log = start_group(tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, port, log)
        follower = children(proc.pid)[0]
        job = httpx.post(f"{url}/jobs", json=dict(QUICK, width=512, height=512, num_inference_steps=50),
                         timeout=30).json()
        wait_for(lambda: httpx.get(f"{url}/jobs/{job['job_id']}").json().get("step", 0) >= 1, timeout=60)
        os.kill(follower, signal.SIGKILL)
        # rank 0 cannot finish the render's collectives without it: it exits non-zero for its supervisor, at
        # once (4: its watcher saw the death; 3: the collective failed first and the worker turned failed)
        code = proc.wait(20)
        assert code in (3, 4), log.read_text()[-3000:]
        text = log.read_text()
        assert "exited with -9" in text or "GPU group lost step" in text, text[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_a_follower_ignores_stop_signals_and_rank0_drains(tmp_path):
    """SIGTERM to the whole process group (systemd's or a terminal's Ctrl-C): the follower stays for rank 0's
    drain, and both exit 0."""
    proc, port, log = start_group(tmp_path)
    try:
        wait_ready(proc, port, log)
        follower = children(proc.pid)[0]
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
        assert wait_for(lambda: not alive(follower), timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
