"""main_bf16.py and main_fp4.py as real processes on free ports: health, generate, fetch, SIGTERM drain."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.clients import Background, wait_for
from tests.ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
START_TIMEOUT_S = 120
# ~2 s of dummy:tiny on a CPU: long enough to still be on the GPU thread when SIGTERM lands
SLOW = {"prompt": "a long exposure of a city at night", "width": 512, "height": 512, "num_inference_steps": 50,
        "seed": 3}
QUICK = {"prompt": "a paper boat", "width": 256, "height": 256, "num_inference_steps": 2, "seed": 5}


@dataclass
class Worker:
    precision: str
    port: int
    output_dir: Path
    log_path: Path
    proc: subprocess.Popen
    health_seen: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def poll_health(self) -> bool:
        """One /health poll; records each new state; True once ready."""
        if self.proc.poll() is not None:
            pytest.fail(f"{self.precision} worker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        try:
            response = httpx.get(f"{self.url}/health", timeout=2)
        except httpx.TransportError:
            return False
        status = response.json()["status"]
        if not self.health_seen or self.health_seen[-1] != status:
            self.health_seen.append(status)
        return response.status_code == 200


def wait_all_ready(workers: list[Worker]) -> None:
    """Polls every worker in turn from the start, so each one's "loading" phase is seen, not only the first's."""
    deadline = time.monotonic() + START_TIMEOUT_S
    pending = list(workers)
    while pending and time.monotonic() < deadline:
        pending = [w for w in pending if not w.poll_health()]
        time.sleep(0.02)
    for worker in pending:
        pytest.fail(f"{worker.precision} worker not ready after {START_TIMEOUT_S} s:\n{worker.log()[-3000:]}")


def start_worker(precision: str, tmp: Path) -> Worker:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLUX_", "BF16_", "FP4_", "FP8_"))}
    env.update({
        f"{precision.upper()}_API_PORT": str(port),
        "FLUX_MODEL": "dummy:tiny",
        "FLUX_DEVICE": "cpu",
        "FLUX_OUTPUT_DIR": str(tmp / f"{precision}-images"),
        # a warm-up of a second or more, so that "loading" is observable between the bind and "ready"
        "FLUX_WARMUP_SIZES": "1024x1024,512x512",
        "FLUX_WARMUP_STEPS": "2",
        "FLUX_DRAIN_TIMEOUT_S": "60",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    })
    log_path = tmp / f"{precision}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, f"main_{precision}.py"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return Worker(precision, port, tmp / f"{precision}-images", log_path, proc)


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workers")
    started = {p: start_worker(p, tmp) for p in ("bf16", "fp4")}  # both import torch at the same time
    try:
        wait_all_ready(list(started.values()))
        yield started
    finally:
        for worker in started.values():
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait(10)


def listening_addresses(port: int) -> set[str]:
    """Local addresses of sockets listening on `port` (from /proc/net/tcp*: hex address, state 0A)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.rpartition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


@pytest.mark.parametrize("precision", ["bf16", "fp4"])
def test_worker_process_serves_health_info_generate_and_the_image(workers, precision):
    worker = workers[precision]
    assert worker.health_seen[0] == "loading", worker.health_seen  # the port is bound before the model loads
    assert worker.health_seen[-1] == "ready"
    if Path("/proc/net/tcp").exists():
        assert listening_addresses(worker.port) == {"0100007F"}  # 127.0.0.1 only, unless FLUX_HOST says so

    assert httpx.get(f"{worker.url}/live").json() == {"status": "alive"}
    info = httpx.get(f"{worker.url}/").json()
    assert (info["model"], info["synthetic"], info["precision"]) == ("dummy:tiny", True, precision)
    assert (info["port"], info["state"], info["device"]) == (worker.port, "ready", "cpu")

    response = httpx.post(f"{worker.url}/generate", json=QUICK, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["precision"] == precision and body["seed"] == QUICK["seed"]
    assert body["image_url"].startswith(f"{worker.url}/images/")
    image = httpx.get(body["image_url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content.startswith(PNG_MAGIC)
    name = body["image_url"].rsplit("/", 1)[1]
    assert (worker.output_dir / name).read_bytes() == image.content

    again = httpx.post(f"{worker.url}/generate", json=QUICK, timeout=60).json()
    assert httpx.get(again["image_url"]).content == image.content  # same seed, same process: same bytes

    bad = httpx.post(f"{worker.url}/generate", json={"prompt": "", "width": 256}, timeout=10)
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "prompt"
    assert httpx.get(f"{worker.url}/health").status_code == 200

    stats = httpx.get(f"{worker.url}/queue-stats").json()
    assert (stats["completed"], stats["max_concurrent"], stats["max_queue_size"]) == (2, 2, 100)

    # one access-log line per request: id, status, queue ms, generate ms
    request_id = body["request_id"]
    lines = wait_for(lambda: [ln for ln in worker.log().splitlines() if f"request_id={request_id}" in ln],
                     timeout=20)
    assert len(lines) == 1
    assert "status=200" in lines[0] and "queue_ms=" in lines[0] and "generate_ms=" in lines[0]
    assert "generate_ms=None" not in lines[0]


@pytest.mark.parametrize("precision", ["bf16", "fp4"])
def test_sigterm_answers_work_in_flight_then_exits_zero(workers, precision):
    worker = workers[precision]
    stats = lambda: httpx.get(f"{worker.url}/queue-stats").json()  # noqa: E731

    in_flight = Background(worker.url, SLOW, timeout=120)
    wait_for(lambda: stats()["running"] == 1, timeout=20)
    queued = Background(worker.url, QUICK, timeout=120)  # another size: it waits behind the running one
    wait_for(lambda: stats()["queued"] == 1, timeout=20)

    worker.proc.send_signal(signal.SIGTERM)
    health = wait_for(lambda: (r := httpx.get(f"{worker.url}/health")).status_code == 503 and r, timeout=5)
    assert health.json()["status"] == "draining"
    refused = httpx.post(f"{worker.url}/generate", json=QUICK, timeout=10)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    assert in_flight.thread.is_alive(), "the slow request finished before SIGTERM could test the drain"

    for background in (in_flight, queued):
        response = background.result()
        assert response.status_code == 200, response.text
        name = response.json()["image_url"].rsplit("/", 1)[1]
        assert (worker.output_dir / name).read_bytes().startswith(PNG_MAGIC)

    assert worker.proc.wait(30) == 0, worker.log()[-3000:]
    log = worker.log()
    assert "draining" in log and "Traceback" not in log
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{worker.url}/live", timeout=2)
