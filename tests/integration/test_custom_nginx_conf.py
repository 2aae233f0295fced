"""`./start_multi_gpu.sh -c /path/to/custom/nginx.conf` (the guide's custom config) is used as given."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
START = ROOT / "start_multi_gpu.sh"
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")]



def test_start_uses_a_custom_nginx_conf_as_given(tmp_path):
    base, nginx_port = free_port(), free_port()
    env = {**os.environ, "NUM_GPUS": "1", "BASE_PORT": str(base), "NGINX_PORT": str(nginx_port),
           "NGINX_ADDR": "127.0.0.1", "FLUX_DEVICE": "cpu", "FLUX_MODEL": "dummy:tiny",
           "FLUX_PYTHON": sys.executable, "FLUX_RUN_DIR": str(tmp_path / "run"),
           "FLUX_LOG_DIR": str(tmp_path / "logs"), "NGINX_LOG_DIR": str(tmp_path / "logs"),
           "FLUX_OUTPUT_DIR": str(tmp_path / "outputs"), "FLUX_HEALTH_TIMEOUT": "180", "NO_COLOR": "1"}
    env.pop("VIRTUAL_ENV", None)
    rendered = subprocess.run([str(START), "nginx-conf"], cwd=ROOT, env=env, capture_output=True, text=True,
                              check=True).stdout
    # the user's own edit: a location of their own inside the server block
    marker = "        location = /custom-marker { return 200 'custom config in use'; }\n"
    anchor = f"listen 127.0.0.1:{nginx_port};" if f"listen 127.0.0.1:{nginx_port};" in rendered else \
        f"listen {nginx_port};"
    assert anchor in rendered, rendered[:2000]
    custom = tmp_path / "custom.conf"
    custom.write_text(rendered.replace(anchor, anchor + "\n" + marker, 1))

    # NGINX_PORT left unset: the file's own port is the one checked, waited for and shown
    env.pop("NGINX_PORT")
    started = subprocess.run([str(START), "start", "-c", str(custom)], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=240)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"nginx port {nginx_port} (from {custom})" in started.stdout
        assert f"listening on port {nginx_port}" in started.stdout
        url = f"http://127.0.0.1:{nginx_port}"
        with urllib.request.urlopen(f"{url}/custom-marker", timeout=10) as resp:
            assert resp.read().decode() == "custom config in use"
        req = urllib.request.Request(f"{url}/generate", method="POST",
                                     data=json.dumps({"prompt": "a cat", "width": 256, "height": 256,
                                                      "num_inference_steps": 1}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert json.loads(resp.read())["width"] == 256
    finally:
        subprocess.run([str(START), "stop"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
