"""What a new user runs into with the scripts, each with real processes: a -c file on another port, Ctrl-C
during start, the systemd entry points seen by status and the monitor, a foreign program on nginx's port,
old tracebacks and control characters in logs."""
from __future__ import annotations

import http.server
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration.nginx_proc import world_readable_tmp
from tests.ports import free_port, free_port_block
from tests.harness.process import pid_alive

ROOT = Path(__file__).resolve().parents[2]
START = ROOT / "start_multi_gpu.sh"
MONITOR = ROOT / "monitor_multi_gpu.sh"
pytestmark = pytest.mark.integration
needs_nginx = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")


def _env(tmp: Path, **extra: str) -> dict:
    env = {**os.environ, "FLUX_DEVICE": "cpu", "FLUX_MODEL": "dummy:tiny", "FLUX_PYTHON": sys.executable,
           "FLUX_RUN_DIR": str(tmp / "run"), "FLUX_LOG_DIR": str(tmp / "logs"), "NGINX_LOG_DIR": str(tmp / "logs"),
           "FLUX_OUTPUT_DIR": str(tmp / "outputs"), "FLUX_HEALTH_TIMEOUT": "180", "FLUX_DRAIN_TIMEOUT": "5",
           "NGINX_ADDR": "127.0.0.1", "NO_COLOR": "1", **extra}
    env.pop("VIRTUAL_ENV", None)
    for name in [k for k, v in env.items() if v is None]:
        env.pop(name)
    return env


def _run(script: Path, env: dict, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


class _Foreign:
    """Some other program answering HTTP 200 to everything on a port."""

    def __init__(self, port: int):
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = b"flux-nginx 0000000000000000\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@needs_nginx
def test_custom_conf_on_another_port_is_refused_before_anything_starts(tmp_path):
    base, file_port, env_port = free_port_block(1), free_port(), free_port()
    env = _env(tmp_path, NUM_GPUS="1", BASE_PORT=str(base), NGINX_PORT=str(file_port))
    conf = tmp_path / "custom.conf"
    conf.write_text(_run(START, env, "nginx-conf").stdout)
    foreign = _Foreign(env_port)  # whatever already runs on NGINX_PORT is never touched
    try:
        result = _run(START, {**env, "NGINX_PORT": str(env_port)}, "start", "-c", str(conf), timeout=60)
        assert result.returncode != 0
        assert str(file_port) in result.stderr and str(env_port) in result.stderr, result.stderr
        assert not list((tmp_path / "run").glob("worker_gpu*")), "a worker was started"
        assert foreign.server.socket.fileno() >= 0
    finally:
        foreign.close()


def test_ctrl_c_during_start_stops_the_loading_workers(tmp_path):
    base = free_port_block(2)
    env = _env(tmp_path, NUM_GPUS="2", BASE_PORT=str(base), NGINX_PORT=str(free_port()))
    proc = subprocess.Popen([str(START), "start"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    run = tmp_path / "run"
    def written():  # a pid file exists a moment before its pid is in it
        return [p.read_text().split()[:1] for p in run.glob("worker_gpu*.pid")]

    deadline = time.monotonic() + 60
    while not (len(w := written()) == 2 and all(w)) and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = [int(p[0]) for p in written() if p]
    assert len(pids) == 2
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "interrupted" in err and "stopping what was started" in err, out + err
    assert not any(pid_alive(pid) for pid in pids)
    assert _run(START, env, "status").returncode == 3


@needs_nginx
def test_systemd_entry_points_are_what_status_and_the_monitor_describe(tmp_path):
    """flux-worker@N runs `start_multi_gpu.sh worker N`, flux-nginx `start_multi_gpu.sh nginx`: no `start`,
    no run/state. status and the monitor still list both workers, their pids, the precision each really
    serves (fp8 asked, bf16 served on CPU), and our nginx; a foreign program on the port is not taken for
    it, and the monitor prints no control characters from logs and marks earlier runs' tracebacks."""
    base, nginx_port = free_port_block(2), free_port()
    out = world_readable_tmp(tmp_path)
    env = _env(tmp_path, NUM_GPUS="2", BASE_PORT=str(base), NGINX_PORT=str(nginx_port), FLUX_MODE="fp8,fp4",
               FLUX_OUTPUT_DIR=str(out))
    logs = tmp_path / "logs"
    logs.mkdir()
    old_log = logs / f"flux_gpu0_port{base}.log"
    old_log.write_text("=== 2026-01-01 00:00:00 start GPU 0 fp8 port 1 ===\nTraceback (most recent call last):\n"
                       "RuntimeError: an old failure\n")
    procs = [subprocess.Popen([str(START), "worker", str(i)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True) for i in range(2)]
    try:
        monitor_env = {k: v for k, v in env.items() if k not in ("NUM_GPUS", "BASE_PORT", "NGINX_PORT")}
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if _run(MONITOR, monitor_env, "--once", timeout=60).stdout.count(" ready ") >= 2:
                break
            time.sleep(1)
        procs.append(subprocess.Popen([str(START), "nginx"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + 20
        while "nginx: up" not in (st := _run(START, monitor_env, "status")).stdout + st.stderr:
            assert time.monotonic() < deadline, st.stdout + st.stderr
            time.sleep(0.2)
        assert st.returncode == 0, st.stdout + st.stderr
        rows = {ln.split()[1]: ln for ln in st.stdout.splitlines() if ln.split()[:1] in (["0"], ["1"])}
        assert str(procs[0].pid) in rows[str(base)] and "bf16 (asked fp8)" in rows[str(base)], st.stdout
        assert str(procs[1].pid) in rows[str(base + 1)] and " fp4 " in rows[str(base + 1)], st.stdout

        with open(logs / f"flux_gpu1_port{base + 1}.log", "a") as fh:
            fh.write("2026-11-30 00:00:00,000 ERROR flux: \x1b[2J\x1b]0;owned\x07 planted\r\n")
            # what an escaped client string looks like inside a worker's line: never an error
            fh.write("2026-11-30 00:00:01,000 INFO flux.access: path=/x\\x0aERROR Traceback RuntimeError: forged\n")
        mon = _run(MONITOR, monitor_env, "--once", "--errors", timeout=60)
        assert mon.returncode == 0, mon.stdout + mon.stderr
        assert str(base) in mon.stdout and str(base + 1) in mon.stdout and "nginx: up" in mon.stdout
        assert "2/2 ready" in mon.stdout
        assert "planted" in mon.stdout and not any(c in mon.stdout for c in "\x1b\x07\r"), repr(mon.stdout)
        assert "an old failure" not in mon.stdout and "earlier runs" in mon.stdout
        assert "forged" not in mon.stdout, mon.stdout
        every = _run(MONITOR, monitor_env, "--once", "--all-errors", timeout=60)
        assert "[earlier run] RuntimeError: an old failure" in every.stdout, every.stdout
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(out, ignore_errors=True)

    # nothing of ours runs now; a program on nginx's port answering even our probe's words is not our nginx
    foreign = _Foreign(nginx_port)
    try:
        mon = _run(MONITOR, monitor_env, "--once", timeout=60)
        assert "nginx: up" not in mon.stdout and "not ours" in mon.stdout, mon.stdout
    finally:
        foreign.close()


def test_readme_one_worker_command_works_as_written(tmp_path):
    """The README's no-GPU line, run as written (only the port changed to a free one) with the project's venv."""
    import re
    import urllib.request
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## One worker"):]
    line = next(ln for ln in section.splitlines() if "dummy:tiny" in ln and "main_fp4.py" in ln)
    command = line.split("#")[0].strip()
    assert command.startswith("FLUX_MODEL=dummy:tiny") and ".venv/bin/python" in command, command
    if not (ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("no .venv (scripts/setup_venv.sh makes it)")
    port = free_port()
    command = command.replace("8003", str(port))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_") and k != "CUDA_VISIBLE_DEVICES"}
    env["FLUX_OUTPUT_DIR"] = str(tmp_path / "outputs")
    proc = subprocess.Popen(["bash", "-c", command], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", method="POST",
                                     data=b'{"prompt": "a cat", "width": 256, "height": 256, "num_inference_steps": 1}',
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    # and the README's links stay inside the repository
    for target in re.findall(r"\]\(([^)#]+)", readme):
        if "://" not in target:
            assert (ROOT / target).resolve().is_relative_to(ROOT) and (ROOT / target).exists(), target
