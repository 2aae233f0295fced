"""start_multi_gpu.sh, monitor_multi_gpu.sh and the nginx configs, with real processes.

One fleet of three CPU workers (dummy:tiny, precisions fp4,fp4,bf16) behind a real nginx on free
loopback ports, started and stopped through the scripts exactly as a user would. Run state, logs
and images live in a temporary folder so a user's own instance is never touched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration.nginx_proc import world_readable_tmp
from tests.ports import free_port_block, port_free
from tests.harness.process import pid_alive

ROOT = Path(__file__).resolve().parents[2]
START = ROOT / "start_multi_gpu.sh"
MONITOR = ROOT / "monitor_multi_gpu.sh"
NUM_WORKERS = 3
MODES = "fp4,fp4,bf16"
BODY = {"prompt": "a red cube on a table", "width": 256, "height": 256, "num_inference_steps": 2}

pytestmark = pytest.mark.integration

needs_nginx = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _request(method: str, url: str, body: dict | None = None, timeout: float = 60.0):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def _get_json(url: str) -> dict:
    status, _, raw = _request("GET", url, timeout=10)
    assert status == 200, (url, status, raw[:300])
    return json.loads(raw)


def _completed(port: int) -> int:
    return int(_get_json(f"http://127.0.0.1:{port}/queue-stats")["completed"])


class Fleet:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.base_port = free_port_block(NUM_WORKERS)
        self.nginx_port = free_port_block(1)
        self.env = {
            **os.environ,
            "NUM_GPUS": str(NUM_WORKERS),
            "BASE_PORT": str(self.base_port),
            "NGINX_PORT": str(self.nginx_port),
            "NGINX_ADDR": "127.0.0.1",
            "FLUX_DEVICE": "cpu",
            "FLUX_MODEL": "dummy:tiny",
            "FLUX_PYTHON": sys.executable,
            "FLUX_RUN_DIR": str(tmp / "run"),
            "FLUX_LOG_DIR": str(tmp / "logs"),
            # a folder nginx's unprivileged workers can read (pytest's tmp is 0700 for root)
            "FLUX_OUTPUT_DIR": str(world_readable_tmp(tmp)),
            "NGINX_LOG_DIR": str(tmp / "logs"),
            "FLUX_HEALTH_TIMEOUT": "180",
            "FLUX_DRAIN_TIMEOUT": "10",
            "NO_COLOR": "1",
        }
        self.env.pop("VIRTUAL_ENV", None)
        self.url = f"http://127.0.0.1:{self.nginx_port}"
        self.ports = [self.base_port + i for i in range(NUM_WORKERS)]
        self.start_result: subprocess.CompletedProcess | None = None

    def run(self, script: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(script), *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def pid(self, gpu: int) -> int:
        return int((self.tmp / "run" / f"worker_gpu{gpu}.pid").read_text().split()[0])

    def all_pids(self) -> list[int]:
        return [int(p.read_text().split()[0]) for p in (self.tmp / "run").glob("*.pid")]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed")
    f = Fleet(tmp_path_factory.mktemp("fleet"))
    f.start_result = f.run(START, "start", "-m", MODES)
    pids = f.all_pids()
    try:
        assert f.start_result.returncode == 0, f.start_result.stdout + f.start_result.stderr
        yield f
    finally:
        f.run(START, "stop", timeout=120)
        for pid in pids:  # never leave a process behind, even when stop is broken
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(f.env["FLUX_OUTPUT_DIR"], ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# static checks
# ---------------------------------------------------------------------------------------------
SCRIPTS = [START, MONITOR, ROOT / "scripts" / "lib.sh"]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
    scripts = sorted({*SCRIPTS, *ROOT.glob("*.sh"), *(ROOT / "scripts").glob("*.sh")})
    result = subprocess.run(["shellcheck", "-x", *map(str, scripts)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_nginx
@pytest.mark.parametrize("conf", ["nginx.conf", "nginx_mixed.conf"])
def test_shipped_nginx_configs_pass_nginx_t(conf, tmp_path):
    result = subprocess.run(
        ["nginx", "-t", "-p", f"{tmp_path}/", "-c", str(ROOT / conf), "-g", f"pid {tmp_path}/nginx.pid;"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("conf", "mode"), [("nginx.conf", "fp4"), ("nginx_mixed.conf", "mixed")])
def test_shipped_nginx_configs_match_the_renderer(conf, mode):
    """The shipped files are what the script renders for 8 GPUs: they cannot drift apart."""
    env = {**os.environ, "NUM_GPUS": "8", "BASE_PORT": "8000", "NGINX_PORT": "80", "FLUX_DEVICE": "cuda"}
    env.pop("NGINX_ADDR", None)
    env.pop("FLUX_RATE_LIMIT", None)
    result = subprocess.run(
        [str(START), "nginx-conf", "-m", mode], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == (ROOT / conf).read_text()
    assert "server 127.0.0.1:8000 max_fails=3 fail_timeout=30s;" in result.stdout
    assert "least_conn;" in result.stdout


@needs_nginx
def test_rate_limited_config_passes_nginx_t(tmp_path):
    env = {**os.environ, "NUM_GPUS": "2", "BASE_PORT": "8000", "NGINX_PORT": "8080", "FLUX_DEVICE": "cpu",
           "FLUX_RATE_LIMIT": "5r/s"}
    rendered = subprocess.run([str(START), "nginx-conf"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert rendered.returncode == 0, rendered.stderr
    assert "limit_req_zone" in rendered.stdout
    conf = tmp_path / "rate.conf"
    conf.write_text(rendered.stdout)
    result = subprocess.run(
        ["nginx", "-t", "-p", f"{tmp_path}/", "-c", str(conf), "-g", f"pid {tmp_path}/nginx.pid;"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_port_in_use_is_named_with_its_holder(tmp_path):
    base = free_port_block(2)
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", base + 1))
    holder.listen()
    try:
        env = {**os.environ, "NUM_GPUS": "2", "BASE_PORT": str(base), "FLUX_DEVICE": "cpu",
               "FLUX_RUN_DIR": str(tmp_path / "run"), "FLUX_LOG_DIR": str(tmp_path / "logs"),
               "FLUX_PYTHON": sys.executable, "NO_COLOR": "1"}
        result = subprocess.run([str(START)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    finally:
        holder.close()
    assert result.returncode != 0
    assert f"port {base + 1}" in result.stderr
    if shutil.which("lsof") or shutil.which("ss"):
        assert str(os.getpid()) in result.stderr  # the holder's pid
    assert port_free(base), "nothing may be left running after a refused start"


# ---------------------------------------------------------------------------------------------
# the running fleet (tests run in file order: the destructive ones come last)
# ---------------------------------------------------------------------------------------------
def test_start_prints_a_table_and_the_url(fleet):
    out = fleet.start_result.stdout
    assert "CPU DEMO" in out
    for gpu, port in enumerate(fleet.ports):
        assert str(port) in out and str(fleet.pid(gpu)) in out
    assert out.count("ready") >= NUM_WORKERS
    assert f"{fleet.url}/generate" in out


def test_start_shows_each_workers_progress_and_ready_time(fleet):
    out = fleet.start_result.stdout
    summary = re.search(r"ready after: (.*)", out)
    assert summary, out
    assert sorted(re.findall(r"GPU(\d+) \d+s", summary.group(1))) == [str(i) for i in range(NUM_WORKERS)]  # in the order they got ready
    # while waiting, each worker's entry says what it is doing and for how long (from /health's progress)
    for line in re.findall(r"waiting \d+s/\d+s:(.*)", out):
        for entry in re.findall(r"GPU\d+:(\S+(?: \S+)*?)(?= GPU\d+:|$)", line):
            assert re.search(r"\(\d+s", entry), line  # "starting (5s)" before a worker answers at all


def test_second_start_is_refused(fleet):
    result = fleet.run(START, "start")
    assert result.returncode != 0
    assert "already running" in result.stderr


def test_status_reports_every_worker(fleet):
    result = fleet.run(START, "status")
    assert result.returncode == 0, result.stdout + result.stderr
    for port in fleet.ports:
        assert str(port) in result.stdout


def test_requests_through_nginx_spread_over_all_workers(fleet):
    before = [_completed(p) for p in fleet.ports]
    with ThreadPoolExecutor(max_workers=NUM_WORKERS) as pool:
        results = list(pool.map(lambda _: _request("POST", f"{fleet.url}/generate", BODY), range(3 * NUM_WORKERS)))
    for status, headers, raw in results:
        assert status == 200, raw[:300]
        assert headers.get("X-Request-ID")
    after = [_completed(p) for p in fleet.ports]
    assert all(a > b for a, b in zip(after, before)), f"completed before {before}, after {after}"

    # The image is served by nginx from the shared output folder.
    image_url = json.loads(results[0][2])["image_url"]
    path = image_url[image_url.index("/images/"):]
    status, headers, raw = _request("GET", f"{fleet.url}{path}")
    assert status == 200 and headers.get("Content-Type") == "image/png" and raw[:4] == b"\x89PNG"
    # from the folder by nginx itself (the worker does not say immutable), with the request's id
    assert headers.get("Cache-Control") == "public, max-age=86400, immutable"
    assert headers.get("X-Request-ID")


def test_the_same_idempotency_key_reaches_the_same_worker(fleet):
    """least_conn would spread six retries over the workers, each generating its own image; hashed on the
    key they all reach one worker, which answers the first job every time."""
    out = Path(fleet.env["FLUX_OUTPUT_DIR"])
    before = len(list(out.iterdir()))
    key = f"retry-{time.time_ns()}"
    answers = []
    for _ in range(6):
        req = urllib.request.Request(f"{fleet.url}/generate", data=json.dumps(BODY).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Idempotency-Key": key})
        with urllib.request.urlopen(req, timeout=60) as resp:
            answers.append(json.loads(resp.read()))
    assert len({a["job_id"] for a in answers}) == 1, [a["job_id"] for a in answers]
    assert len(list(out.iterdir())) == before + 1


def test_nginx_workers_do_not_run_as_root(fleet):
    if os.geteuid() != 0:
        pytest.skip("only a root start chooses the account")
    master = int((fleet.tmp / "run" / "nginx.pid").read_text().split()[0])
    users = subprocess.run(["ps", "-o", "user=", "--ppid", str(master)], capture_output=True, text=True).stdout.split()
    assert users and "root" not in users, users


@pytest.mark.parametrize("fmt, media_type, magic", [("jpeg", "image/jpeg", b"\xff\xd8\xff"),
                                                    ("webp", "image/webp", b"RIFF")])
def test_nginx_serves_jpeg_and_webp_with_their_media_types(fleet, fmt, media_type, magic):
    status, _, raw = _request("POST", f"{fleet.url}/generate", dict(BODY, output_format=fmt))
    assert status == 200, raw[:300]
    image_url = json.loads(raw)["image_url"]
    status, headers, data = _request("GET", f"{fleet.url}{image_url[image_url.index('/images/'):]}")
    assert status == 200 and headers.get("Content-Type") == media_type and data.startswith(magic)


def test_request_id_is_passed_through_and_logged(fleet):
    req = urllib.request.Request(f"{fleet.url}/generate", data=json.dumps(BODY).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "X-Request-ID": "trace-abc123"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers.get("X-Request-ID") == "trace-abc123"
    access_log = fleet.tmp / "logs" / "access.log"
    deadline = time.time() + 5
    while "trace-abc123" not in access_log.read_text() and time.time() < deadline:
        time.sleep(0.1)
    line = next(ln for ln in access_log.read_text().splitlines() if "trace-abc123" in ln)
    entry = json.loads(line)
    assert entry["status"] == 200 and entry["uri"] == "/generate"


def test_mixed_routes_fast_and_quality_to_their_workers(fleet):
    for _ in range(4):
        status, _, raw = _request("POST", f"{fleet.url}/generate/fast", BODY)
        assert status == 200, raw[:300]
        assert json.loads(raw)["precision"] == "fp4"
        status, _, raw = _request("POST", f"{fleet.url}/generate/quality", BODY)
        assert status == 200, raw[:300]
        body = json.loads(raw)
        assert body["precision"] == "bf16" and body["gpu"] == 2


def test_jobs_reach_the_worker_that_owns_them(fleet):
    ids = []
    for _ in range(NUM_WORKERS * 2):
        status, _, raw = _request("POST", f"{fleet.url}/jobs", BODY)
        assert status == 202, raw[:300]
        ids.append(json.loads(raw)["job_id"])
    assert {i.split("-")[0] for i in ids} <= {str(p) for p in fleet.ports}
    for job_id in ids:
        for _ in range(100):
            job = _get_json(f"{fleet.url}/jobs/{job_id}")
            if job["status"] not in ("queued", "running"):
                break
            time.sleep(0.1)
        assert job["status"] == "succeeded", job
    # An id naming no known worker is answered by nginx, never proxied to that port.
    status, _, raw = _request("GET", f"{fleet.url}/jobs/1-deadbeef")
    assert status == 404 and json.loads(raw)["error"]["code"]


def test_monitor_once_shows_every_worker(fleet):
    for _ in range(2):
        status, _, raw = _request("POST", f"{fleet.url}/generate", BODY)
        assert status == 200, raw[:300]
    result = fleet.run(MONITOR, "--once", "--errors", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    for port in fleet.ports:
        assert str(port) in result.stdout
    assert "nginx: up" in result.stdout
    assert f"{NUM_WORKERS}/{NUM_WORKERS} ready" in result.stdout
    # one sample is enough for the rate: the workers count the images of the last minute themselves
    rate = re.search(r"rate (\d+) images/min", result.stdout)
    assert rate and int(rate.group(1)) >= 2, result.stdout


def test_kill_9_of_one_worker_keeps_nginx_answering(fleet):
    victim = fleet.pid(1)
    os.kill(victim, signal.SIGKILL)
    deadline = time.time() + 10
    while _listening(fleet.ports[1]) and time.time() < deadline:
        time.sleep(0.1)
    for _ in range(2 * NUM_WORKERS):
        status, _, raw = _request("POST", f"{fleet.url}/generate", BODY)
        assert status == 200, raw[:300]

    monitor = fleet.run(MONITOR, "--once", timeout=60)
    assert monitor.returncode != 0
    line = next(ln for ln in monitor.stdout.splitlines() if str(fleet.ports[1]) in ln and "down" in ln)
    assert line


def test_stop_leaves_no_process_and_no_port(fleet):
    pids = fleet.all_pids()
    result = fleet.run(START, "stop", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for pid in pids:
        assert not pid_alive(pid), f"pid {pid} still runs"
    for port in [*fleet.ports, fleet.nginx_port]:
        assert not _listening(port), f"port {port} still bound"
    again = fleet.run(START, "stop")
    assert again.returncode == 0 and "not running" in again.stdout
    status = fleet.run(START, "status")
    assert status.returncode == 3


def test_compose_file_has_one_gpu_worker_per_service():
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "docker-compose.multi-gpu.yml").read_text())
    services = compose["services"]
    assert "nginx" in services
    workers = {name: svc for name, svc in services.items() if name.startswith("flux-gpu")}
    assert len(workers) == 8
    for i in range(8):
        svc = workers[f"flux-gpu{i}"]
        device = svc["deploy"]["resources"]["reservations"]["devices"][0]
        assert device["device_ids"] == [str(i)] and "gpu" in device["capabilities"]
        assert f"FLUX_PORT={8000 + i}" in svc["environment"]
        assert "/health" in " ".join(svc["healthcheck"]["test"])
        assert int(svc["stop_grace_period"].rstrip("s")) > 30  # longer than the default drain
