"""The per-key rate limit rendered by start_multi_gpu.sh, enforced by a real nginx.

nginx answers 429 itself, before any worker is asked, so no worker runs here: a request that passes the
limit reaches an empty port and comes back as nginx's own 502 JSON, which is all the test needs to tell
the two apart.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")]



def _post(url: str, headers: dict[str, str]) -> tuple[int, dict, str]:
    req = urllib.request.Request(url, data=b'{"prompt": "a cat"}', method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


@pytest.fixture()
def limited_nginx(tmp_path):
    nginx_port, worker_port = free_port(), free_port()
    env = {**os.environ, "NUM_GPUS": "1", "BASE_PORT": str(worker_port), "NGINX_PORT": str(nginx_port),
           "NGINX_ADDR": "127.0.0.1", "FLUX_DEVICE": "cpu", "FLUX_RATE_LIMIT": "1r/m", "FLUX_RATE_BURST": "0",
           "FLUX_API_KEYS": "key-a,key-b,key-c",
           "FLUX_OUTPUT_DIR": str(tmp_path / "outputs")}
    rendered = subprocess.run([str(ROOT / "start_multi_gpu.sh"), "nginx-conf"], cwd=ROOT, env=env,
                              capture_output=True, text=True, check=True)
    conf = tmp_path / "nginx.conf"
    conf.write_text(rendered.stdout)
    (tmp_path / "logs").mkdir()
    proc = subprocess.Popen(["nginx", "-p", f"{tmp_path}/", "-c", str(conf), "-g",
                             f"daemon off; pid {tmp_path}/nginx.pid;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", nginx_port)) == 0:
                break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail(f"nginx did not listen: {proc.stderr.read().decode()[-2000:]}")
    yield f"http://127.0.0.1:{nginx_port}"
    proc.send_signal(signal.SIGQUIT)
    proc.wait(timeout=10)


def test_a_key_over_its_rate_gets_429_json_and_other_keys_do_not(limited_nginx):
    url = f"{limited_nginx}/generate"
    first = _post(url, {"Authorization": "Bearer key-a"})
    assert first[0] != 429, first  # within the rate: passed on (to a missing worker: 502)
    second = _post(url, {"Authorization": "Bearer key-a"})
    assert second[0] == 429, second
    assert json.loads(second[2])["error"]["code"] == "rate_limited"
    assert second[1].get("Retry-After"), second[1]
    # every other key has a budget of its own, whichever header carries it
    assert _post(url, {"X-API-Key": "key-b"})[0] != 429
    assert _post(url, {"X-API-Key": "key-b"})[0] == 429
    assert _post(url, {"Authorization": "Bearer key-c"})[0] != 429


def test_made_up_keys_share_the_client_address_budget(limited_nginx):
    """Only keys the workers accept have budgets of their own: random keys in either header, or a random
    X-API-Key next to a valid Bearer token (the worker reads the Bearer token and ignores it), never mint one."""
    url = f"{limited_nginx}/generate"
    assert _post(url, {"X-API-Key": "random-0"})[0] != 429  # the address's one request
    attempts = [{"X-API-Key": f"random-{i}"} for i in range(1, 6)] + \
               [{"Authorization": f"Bearer random-{i}"} for i in range(6)] + \
               [{"Authorization": f"Bearer random-{i}", "X-API-Key": "key-c"} for i in range(3)] + \
               [{"Authorization": "Basic a2V5LWE6", "X-API-Key": f"random-{i}"} for i in range(3)] + \
               [{}]
    for headers in attempts:
        assert _post(url, headers)[0] == 429, headers
    # a valid Bearer key is one budget, whatever X-API-Key rides along
    assert _post(url, {"Authorization": "Bearer key-a", "X-API-Key": "random-x"})[0] != 429
    for i in range(4):
        assert _post(url, {"Authorization": "Bearer key-a", "X-API-Key": f"random-y{i}"})[0] == 429
        assert _post(url, {"Authorization": "bearer   key-a  ", "X-API-Key": "key-b"})[0] == 429
    # X-API-Key counts only when there is no Bearer token (also: an empty one)
    assert _post(url, {"Authorization": "Bearer ", "X-API-Key": "key-b"})[0] != 429
    assert _post(url, {"X-API-Key": "key-b"})[0] == 429


def test_rendered_config_with_keys_is_private(tmp_path):
    """The config holds the keys: start_multi_gpu.sh writes it 0600."""
    from scripts.render_nginx import Options, Worker, write_outputs
    out = tmp_path / "nginx.conf"
    write_outputs([Worker("127.0.0.1", 8000, "fp4")], Options(rate="1r/s", api_keys=["key-a"]), out)
    assert out.stat().st_mode & 0o077 == 0
