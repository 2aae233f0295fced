"""main_bf16.py and main_fp4.py as real processes on free ports: health, generate, fetch, SIGTERM drain."""
from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest

from tests.clients import Background, wait_for
from tests.harness.process import Worker, start_all

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
START_TIMEOUT_S = 120
# ~8 s of dummy:tiny on a CPU: long enough to still be on the GPU thread when SIGTERM lands (512x512 x 50 steps,
# ~2 s, ended before the refusal had been checked on a loaded 2-core machine)
SLOW = {"prompt": "a long exposure of a city at night", "width": 768, "height": 768, "num_inference_steps": 100,
        "seed": 3}
QUICK = {"prompt": "a paper boat", "width": 256, "height": 256, "num_inference_steps": 2, "seed": 5}


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workers")
    # a warm-up of a second or more, so that "loading" is observable between the bind and "ready"
    env = {"FLUX_WARMUP_SIZES": "1024x1024,512x512", "FLUX_WARMUP_STEPS": "2", "FLUX_DRAIN_TIMEOUT_S": "60"}
    started = {p: Worker(p, tmp, env, precision=p) for p in ("bf16", "fp4")}
    try:
        start_all(*started.values(), timeout=START_TIMEOUT_S, interval=0.02)  # both import torch at once
        yield started
    finally:
        for worker in started.values():
            worker.kill()


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
    lines = wait_for(lambda: [ln for ln in worker.log_text().splitlines() if f"request_id={request_id}" in ln],
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

    # checked at the signal, not after the checks below: on a loaded machine they can outlast the slow request
    assert in_flight.thread.is_alive(), "the slow request finished before SIGTERM could test the drain"
    worker.proc.send_signal(signal.SIGTERM)
    health = wait_for(lambda: (r := httpx.get(f"{worker.url}/health")).status_code == 503 and r, timeout=5)
    assert health.json()["status"] == "draining"
    refused = httpx.post(f"{worker.url}/generate", json=QUICK, timeout=10)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"

    for background in (in_flight, queued):
        response = background.result()
        assert response.status_code == 200, response.text
        name = response.json()["image_url"].rsplit("/", 1)[1]
        assert (worker.output_dir / name).read_bytes().startswith(PNG_MAGIC)

    assert worker.proc.wait(30) == 0, worker.log_text()[-3000:]
    log = worker.log_text()
    assert "draining" in log and "Traceback" not in log
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{worker.url}/live", timeout=2)
