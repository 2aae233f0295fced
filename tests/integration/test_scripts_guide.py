"""The user guide's steps a new user meets, run as written against the real scripts: a custom nginx config laid
out as people write them (one line, servers in an included folder), bad knob values, the monitor's flags and
the systemd units as the docs tell you to install them."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.integration.nginx_proc import world_readable_tmp
from tests.ports import free_port, free_port_block

ROOT = Path(__file__).resolve().parents[2]
START = ROOT / "start_multi_gpu.sh"
MONITOR = ROOT / "monitor_multi_gpu.sh"
RENDERER = ROOT / "scripts" / "render_nginx.py"
pytestmark = pytest.mark.integration
needs_nginx = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")


def _env(tmp: Path, **extra: str) -> dict:
    env = {**os.environ, "FLUX_DEVICE": "cpu", "FLUX_MODEL": "dummy:tiny", "FLUX_PYTHON": sys.executable,
           "FLUX_RUN_DIR": str(tmp / "run"), "FLUX_LOG_DIR": str(tmp / "logs"), "NGINX_LOG_DIR": str(tmp / "logs"),
           "FLUX_OUTPUT_DIR": str(tmp / "outputs"), "FLUX_HEALTH_TIMEOUT": "180", "FLUX_DRAIN_TIMEOUT": "5",
           "NO_COLOR": "1", **extra}
    for name in ("VIRTUAL_ENV", "NGINX_PORT", "BASE_PORT", "NUM_GPUS"):
        if name not in extra:
            env.pop(name, None)
    return env


def _listen_ports(conf: Path) -> list[int]:
    out = subprocess.run([sys.executable, str(RENDERER), "listen-port", str(conf)], capture_output=True, text=True,
                         check=True).stdout
    return [int(p) for p in out.split()]


def test_listen_ports_are_read_however_the_file_is_laid_out(tmp_path):
    """One-line blocks, two listens on a line, servers in an included folder (Debian's layout); a `listen` in a
    comment or inside a quoted string is not one."""
    (tmp_path / "sites").mkdir()
    (tmp_path / "sites" / "a.conf").write_text("server { listen 127.0.0.1:9001 default_server; }\n")
    (tmp_path / "sites" / "b.conf").write_text("server {\n    listen [::]:9002 ipv6only=on; # listen 5;\n}\n")
    main = tmp_path / "nginx.conf"
    main.write_text("events {}\nhttp { include sites/*.conf; server { listen 8085; listen 8086 reuseport; "
                    "return 200 'listen 9;'; } }  # listen 7;\n")
    assert _listen_ports(main) == [9001, 9002, 8085, 8086]
    # an include of itself does not loop
    (tmp_path / "loop.conf").write_text("include loop.conf;\nhttp { server { listen 8090; } }\n")
    assert _listen_ports(tmp_path / "loop.conf") == [8090]


@needs_nginx
def test_start_with_a_one_line_custom_conf_whose_server_is_included(tmp_path):
    """`./start_multi_gpu.sh -c /path/to/custom/nginx.conf` with a config a user writes by hand: its server, in
    an included file, on one line. The port is the file's, the API answers through it, stop stops it all."""
    base, nginx_port = free_port(), free_port()
    env = _env(tmp_path, NUM_GPUS="1", BASE_PORT=str(base))
    conf_dir = tmp_path / "conf"
    (conf_dir / "servers").mkdir(parents=True)
    (conf_dir / "servers" / "flux.conf").write_text(
        f"upstream flux {{ least_conn; server 127.0.0.1:{base}; }} "
        f"server {{ listen 127.0.0.1:{nginx_port}; location / {{ proxy_pass http://flux; }} }}\n")
    conf = conf_dir / "nginx.conf"
    conf.write_text("worker_processes 1; error_log stderr warn; events { worker_connections 64; } "
                    "http { access_log off; include servers/*.conf; }\n")
    started = subprocess.run([str(START), "-c", str(conf)], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=240)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"listening on port {nginx_port}" in started.stdout, started.stdout + started.stderr
        req = urllib.request.Request(f"http://127.0.0.1:{nginx_port}/generate", method="POST",
                                     data=json.dumps({"prompt": "A beautiful mountain landscape", "width": 256,
                                                      "height": 256}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert json.loads(resp.read())["image_url"]
        status = subprocess.run([str(START), "status"], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=60)
        assert status.returncode == 0 and f"nginx: up on port {nginx_port}" in status.stdout + status.stderr
    finally:
        stopped = subprocess.run([str(START), "stop"], cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert subprocess.run([str(START), "status"], cwd=ROOT, env=env, capture_output=True,
                          timeout=60).returncode == 3


@needs_nginx
def test_start_with_the_shipped_nginx_conf_serves_the_api_images_and_pages(tmp_path):
    """The guide's `-c` with the shipped nginx.conf, its ports moved to free ones (ports, pools and worker ids:
    the edit the guide asks for) and one worker of its eight running: /generate, the image, /ui/ and
    /dashboard/ all answer through it."""
    base, nginx_port = free_port_block(8), free_port()
    text = (ROOT / "nginx.conf").read_text()
    text = re.sub(r"\b800([0-7])\b", lambda m: str(base + int(m.group(1))), text)
    text = text.replace("listen 80;", f"listen 127.0.0.1:{nginx_port};")
    conf = tmp_path / "custom.conf"
    conf.write_text(text)
    run_dir = world_readable_tmp(tmp_path)  # nginx's unprivileged workers read the pages under its prefix
    env = _env(tmp_path, NUM_GPUS="1", BASE_PORT=str(base), FLUX_RUN_DIR=str(run_dir))
    started = subprocess.run([str(START), "-c", str(conf)], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=240)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert "/web" not in started.stderr, started.stderr
        url = f"http://127.0.0.1:{nginx_port}"
        req = urllib.request.Request(f"{url}/generate", method="POST",
                                     data=json.dumps({"prompt": "A futuristic city", "width": 256, "height": 256,
                                                      "seed": 42}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            image_url = json.loads(resp.read())["image_url"]
        assert image_url.startswith(url + "/images/"), image_url
        with urllib.request.urlopen(image_url, timeout=30) as resp:
            assert resp.read(8) == b"\x89PNG\r\n\x1a\n"
        for page in ("/ui/", "/dashboard/"):
            with urllib.request.urlopen(url + page, timeout=10) as resp:
                assert resp.status == 200 and b"<html" in resp.read().lower(), page
    finally:
        subprocess.run([str(START), "stop"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        shutil.rmtree(run_dir, ignore_errors=True)


def test_an_edit_of_the_shipped_nginx_conf_is_not_silently_ignored(tmp_path):
    """The guide says to edit nginx.conf's upstream; `start` renders its own config, so it says that the edit is
    not used and how to use it (-c). An unedited checkout starts without the warning."""
    project = tmp_path / "project"
    for name in ("start_multi_gpu.sh", "nginx.conf", "nginx_mixed.conf", "main_fp4.py", "scripts", "deploy/nginx"):
        src, dst = ROOT / name, project / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    env = _env(tmp_path, NUM_GPUS="1", BASE_PORT=str(free_port()), NGINX_PORT=str(free_port()),
               FLUX_HEALTH_TIMEOUT="30")

    def start() -> str:  # the copy has no api/: its worker exits at once, and start stops
        proc = subprocess.run([str(project / "start_multi_gpu.sh")], cwd=project, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode != 0
        return proc.stderr

    assert "was edited" not in start()
    env["FLUX_API_KEYS"] = "a-key-of-this-deployment"  # keys go into start's config, never into the shipped ones
    assert "was edited" not in start()
    del env["FLUX_API_KEYS"]
    conf = project / "nginx.conf"
    conf.write_text(re.sub(r"(?m)^\s*server 127\.0\.0\.1:800[4-7] .*\n", "", conf.read_text()))  # the guide's edit
    said = start()
    assert "nginx.conf was edited" in said and "start with -c nginx.conf" in said, said
    assert "nginx_mixed.conf was edited" not in said


@pytest.mark.parametrize("args", [["-g", "2"], ["worker", "1", "-g", "2"], ["start", "-g", "1,2", "-m", "bf16,fp8"]])
def test_a_gpu_group_on_a_cpu_machine_is_refused_before_anything_starts(tmp_path, args):
    """-g (a worker of several GPUs, latency mode) is a GPU-only flag: the CPU demo accepts the flag and says in
    one line why it cannot run it, instead of starting a worker that fails to load."""
    env = _env(tmp_path, NUM_GPUS="3" if "1,2" in args else "4", BASE_PORT=str(free_port()),
               NGINX_PORT=str(free_port()))
    proc = subprocess.run([str(START), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "needs CUDA GPUs; use -g 1 here" in proc.stderr, proc.stderr
    assert not list((tmp_path / "run").glob("worker_gpu*")), "a worker was started"


@pytest.mark.parametrize("variable, value, words", [
    ("FP4_API_PORT", "abc", "FP4_API_PORT='abc': Input should be a valid integer"),
    ("FLUX_MAX_CONCURRENT", "0", "FLUX_MAX_CONCURRENT='0': Input should be greater than or equal to 1"),
    ("FLUX_DRAIN_TIMEOUT", "-1", "FLUX_DRAIN_TIMEOUT='-1'"),
    ("FLUX_LOG_LEVEL", "loud", "FLUX_LOG_LEVEL='loud': Value error, use critical, error, warning, info, debug"),
])
def test_a_bad_knob_stops_the_worker_with_one_line_naming_it(tmp_path, variable, value, words):
    """The guide's knobs (FP4_API_PORT, FLUX_MAX_CONCURRENT, ...) with a bad value: the worker exits 2 with
    the variable, its value and the reason on one line, not a traceback."""
    env = {**os.environ, "FLUX_MODEL": "dummy:tiny", "FLUX_DEVICE": "cpu", "FLUX_OUTPUT_DIR": str(tmp_path),
           "FP4_API_PORT": str(free_port()), variable: value}
    proc = subprocess.run([sys.executable, "main_fp4.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"invalid setting {words}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_a_refused_secret_is_named_never_shown(monkeypatch):
    from pydantic import ValidationError

    from api.settings import describe_invalid, load_settings

    monkeypatch.setenv("FLUX_MAX_CONCURRENT", "0")
    with pytest.raises(ValidationError) as caught:
        load_settings("bf16")
    assert describe_invalid(caught.value, "bf16") == \
        "invalid setting FLUX_MAX_CONCURRENT='0': Input should be greater than or equal to 1"
    env = {"FLUX_API_KEY_FILE": "hunter2"}
    refused = ValidationError.from_exception_data(
        "Settings", [{"type": "missing", "loc": ("api_key_file",), "input": "hunter2"}])
    line = describe_invalid(refused, "bf16", env)
    assert "FLUX_API_KEY_FILE=<hidden>" in line and "hunter2" not in line


def test_every_log_level_uvicorn_knows_is_accepted(monkeypatch):
    """FLUX_LOG_LEVEL takes uvicorn's levels, in any case, trace included (unknown to Python's logging)."""
    import io
    import logging

    from api.logs import configure_logging
    from api.settings import load_settings

    root = logging.getLogger()
    saved = root.level, root.handlers[:]
    try:
        for level in ("critical", "error", "warning", "info", "debug", "trace", "TRACE", "Debug"):
            monkeypatch.setenv("FLUX_LOG_LEVEL", level)
            settings = load_settings("bf16")
            configure_logging(settings.log_level, stream=io.StringIO())
            assert logging.getLevelName(root.level) == settings.log_level.upper()
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]


@pytest.mark.parametrize("interval", ["abc", "0", "-1", "1e3"])
def test_monitor_refuses_an_interval_that_is_not_seconds(tmp_path, interval):
    proc = subprocess.run([str(MONITOR), "--interval", interval], cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert f"--interval needs a number of seconds above 0, got '{interval}'" in proc.stderr, proc.stderr


def _installed_units(tmp_path: Path) -> list[Path]:
    """services/* as docs/OPERATIONS.md installs them: /opt/flux-api replaced by this checkout, User and Group by
    the current account."""
    import grp
    import pwd

    user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    units = []
    for src in sorted((ROOT / "services").glob("flux-*")):
        if src.suffix not in (".service", ".target"):
            continue
        text = src.read_text().replace("/opt/flux-api", str(ROOT))
        text = re.sub(r"(?m)^User=flux$", f"User={user}", text)
        text = re.sub(r"(?m)^Group=flux$", f"Group={group}", text)
        dst = tmp_path / src.name
        dst.write_text(text)
        units.append(dst)
    return units


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_units_verify_once_installed_as_the_docs_say(tmp_path):
    units = _installed_units(tmp_path)
    assert {u.name for u in units} >= {"flux-multi-gpu.service", "flux-worker@.service", "flux-nginx.service",
                                      "flux-multi-gpu.target", "flux-gateway.service"}
    worker = tmp_path / "flux-worker@3.service"  # a template is verified through an instance
    worker.write_text((tmp_path / "flux-worker@.service").read_text())
    for unit in [u for u in units if "@." not in u.name] + [worker]:
        proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0 and not proc.stderr.strip(), f"{unit.name}: {proc.stderr}"


def test_every_unit_runs_the_script_with_arguments_it_accepts(tmp_path):
    """Each Exec line's arguments (the unit's %i as 3) parse: the script reaches `-h` after them, exit 0."""
    seen = 0
    for unit in _installed_units(tmp_path):
        for key, line in re.findall(r"(?m)^(ExecStart|ExecStop)=(.*)$", unit.read_text()):
            argv = line.replace("%i", "3").split()
            if not argv[0].endswith("start_multi_gpu.sh"):
                continue
            assert Path(argv[0]) == START, f"{unit.name} {key} runs {argv[0]}"
            proc = subprocess.run([*argv, "-h"], cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                                  timeout=30)
            assert proc.returncode == 0, f"{unit.name} {key}={line}: {proc.stderr}"
            seen += 1
    assert seen >= 6
