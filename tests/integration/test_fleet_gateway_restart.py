"""`start_multi_gpu.sh restart -f fleet.conf` after editing the inventory, with a real nginx: the running gateway
reloads (same process, the port never closes, no request refused), a host added is routed at once, and an
inventory with an error leaves the running gateway exactly as it was (before, restart stopped the gateway first
and then refused the file: a typo took the whole fleet's entry point down)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from scripts.fleet import worker_id
from tests.harness.process import pid_alive
from tests.integration.nginx_proc import EchoUpstream, world_readable_tmp
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
START = ROOT / "start_multi_gpu.sh"
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")]


def _loopback_alias_works() -> bool:
    import socket

    try:
        with socket.socket() as s:
            s.bind(("127.0.0.3", 0))
    except OSError:
        return False
    return True


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


@pytest.mark.skipif(not _loopback_alias_works(), reason="127.0.0.3 cannot be bound here")
def test_restart_f_reloads_the_running_gateway_and_a_bad_inventory_changes_nothing(tmp_path):
    a_port, b_port, port = free_port(), free_port(), free_port()
    inventory = tmp_path / "fleet.conf"
    inventory.write_text(f"127.0.0.2 {a_port} 1 fp4\n")
    env = {**os.environ, "NGINX_PORT": str(port), "NGINX_ADDR": "127.0.0.1", "FLUX_RUN_DIR": str(tmp_path / "run"),
           "FLUX_LOG_DIR": str(tmp_path / "logs"), "FLUX_OUTPUT_DIR": str(world_readable_tmp(tmp_path)),
           "NO_COLOR": "1", "FLUX_STOP_TIMEOUT": "10"}
    url = f"http://127.0.0.1:{port}"
    pidfile = tmp_path / "run" / "gateway" / "nginx.pid"

    def run(*args: str, **extra) -> subprocess.CompletedProcess:
        return subprocess.run([str(START), *args], cwd=ROOT, env={**env, **extra}, capture_output=True, text=True,
                              timeout=90)

    def listed() -> list[str]:
        return [w["id"] for w in json.loads(_get(f"{url}/dashboard/workers.json")[1])["workers"]]

    refused: list[int] = []
    stop = threading.Event()

    def probe():  # the entry point stays open throughout
        while not stop.is_set():
            status, _ = _get(f"{url}/nginx-health")
            if status != 200:
                refused.append(status)
            time.sleep(0.01)

    with EchoUpstream("127.0.0.2", a_port, "a"), EchoUpstream("127.0.0.3", b_port, "b"):
        started = run("gateway", "-f", str(inventory))
        try:
            assert started.returncode == 0, started.stdout + started.stderr
            pid = int(pidfile.read_text().split()[0])
            assert listed() == [worker_id("127.0.0.2", a_port)]
            watcher = threading.Thread(target=probe)
            watcher.start()
            try:
                good = inventory.read_text()
                inventory.write_text(good + f"127.0.0.3 {b_port} one bf16\n")
                bad = run("restart", "-f", str(inventory))
                assert bad.returncode != 0 and "line 2: NUM_WORKERS 'one'" in bad.stderr, bad.stdout + bad.stderr
                assert pid_alive(pid) and int(pidfile.read_text().split()[0]) == pid
                assert listed() == [worker_id("127.0.0.2", a_port)]

                inventory.write_text(good + f"127.0.0.3 {b_port} 1 bf16\n")
                env.pop("NGINX_PORT")  # not given: the port it runs on
                ok = run("restart", "-f", str(inventory))
                assert ok.returncode == 0, ok.stdout + ok.stderr
                assert int(pidfile.read_text().split()[0]) == pid and pid_alive(pid)  # reloaded, not restarted
                new = worker_id("127.0.0.3", b_port)
                # after a reload nginx's old worker processes may take a connection or two more (until they
                # have read their QUIT): wait until both the list and the route come from the new config
                def reloaded() -> bool:
                    status, body = _get(f"{url}/jobs/{new}-0123456789abcdef")
                    return new in listed() and status == 200 and json.loads(body)["server"] == "b"

                deadline = time.monotonic() + 10
                while not reloaded() and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert listed() == [worker_id("127.0.0.2", a_port), new]
                status, body = _get(f"{url}/jobs/{new}-0123456789abcdef")
                assert status == 200 and json.loads(body)["server"] == "b"
            finally:
                stop.set()
                watcher.join(timeout=10)
            assert refused == [], f"{len(refused)} requests refused during the restarts: {refused[:5]}"
        finally:
            run("stop", "-f", str(inventory), NGINX_PORT=str(port))
            try:
                leftover = int(pidfile.read_text().split()[0])
            except (OSError, ValueError):
                leftover = 0
            if leftover and pid_alive(leftover):
                os.kill(leftover, signal.SIGKILL)
            shutil.rmtree(env["FLUX_OUTPUT_DIR"], ignore_errors=True)
