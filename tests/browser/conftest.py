"""The real stack for the browser tests: two CPU workers (dummy:tiny; one fp4, one bf16) behind nginx, started
with start_multi_gpu.sh exactly as a user would, with API keys on, and a headless Chromium driven by selenium.

Screenshots go to test-artifacts/screenshots/ at the repository root (git-ignored), or under
$FLUX_TEST_ARTIFACTS when set; each test saves its own, named after it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.ports import free_port_block
from tests.harness.process import pid_alive

ROOT = Path(__file__).resolve().parents[2]
START = ROOT / "start_multi_gpu.sh"
API_KEY = "browser-test-key"
ARTIFACTS = Path(os.environ.get("FLUX_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "screenshots"


class Stack:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.workers = 2
        self.base_port = free_port_block(self.workers)
        self.nginx_port = free_port_block(1)
        self.url = f"http://127.0.0.1:{self.nginx_port}"
        self.env = {
            **os.environ,
            "NUM_GPUS": str(self.workers), "BASE_PORT": str(self.base_port), "NGINX_PORT": str(self.nginx_port),
            "NGINX_ADDR": "127.0.0.1", "FLUX_DEVICE": "cpu", "FLUX_MODEL": "dummy:tiny",
            "FLUX_PYTHON": sys.executable, "FLUX_RUN_DIR": str(tmp / "run"), "FLUX_LOG_DIR": str(tmp / "logs"),
            "FLUX_OUTPUT_DIR": str(tmp / "outputs"), "NGINX_LOG_DIR": str(tmp / "logs"),
            "FLUX_HEALTH_TIMEOUT": "180", "FLUX_DRAIN_TIMEOUT": "5", "NO_COLOR": "1",
            # one image at a time per worker, so a second job waits in the queue where a test can see it
            # and one more waiting at most, so a test can fill a worker and see 503 queue_full
            "FLUX_MAX_CONCURRENT": "1", "FLUX_MAX_QUEUE_SIZE": "1",
            "FLUX_WARMUP_SIZES": "256x256", "FLUX_WARMUP_STEPS": "1",
            "FLUX_API_KEYS": API_KEY,
        }
        self.env.pop("VIRTUAL_ENV", None)
        self.ports = [self.base_port + i for i in range(self.workers)]
        self.precisions = ["fp4", "bf16"]  # a mixed deployment: the playground offers fast and quality

    def run(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run([str(START), *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def pids(self) -> list[int]:
        return [int(p.read_text().split()[0]) for p in (self.tmp / "run").glob("*.pid")]

    def worker_pid(self, i: int) -> int:
        return int((self.tmp / "run" / f"worker_gpu{i}.pid").read_text().split()[0])

    def request(self, method: str, url: str, body: dict | None = None, key: str | None = API_KEY):
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed")
    s = Stack(tmp_path_factory.mktemp("web"))
    result = s.run("start", "-m", ",".join(s.precisions))
    pids = s.pids()
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        yield s
    finally:
        s.run("stop", timeout=120)
        for pid in pids:  # never leave a process behind
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("chromium and chromedriver are not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--force-device-scale-factor=1", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def shot(browser, request):
    """shot(suffix="") saves a screenshot named after the test; failures save one too."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    name = request.node.name.replace("/", "_")

    def take(suffix: str = "") -> Path:
        path = ARTIFACTS / f"{name}{'-' + suffix if suffix else ''}.png"
        browser.save_screenshot(str(path))
        return path

    yield take
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        take("failure")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_call = rep
