"""Three CPU workers behind the real nginx, started the way the systemd units start them.

`start_multi_gpu.sh worker N` (ExecStart of flux-worker@N.service) and `start_multi_gpu.sh nginx` (of
flux-nginx.service) run under a small supervisor that does what the units' Restart=on-failure does. Through
nginx: job ids reach the worker that owns them (status, cancel, events), and a worker killed with SIGKILL under
load fails only the requests it held - fast, as JSON - while every other request succeeds; it is restarted,
and nginx sends it traffic again once it is healthy.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.ports import free_port_block
from tests.harness.process import healthy
from tests.production.conftest import (LONG_JOB, PYTHON, QUICK_JOB, ROOT, assert_png, free_port, sse_events,
                                       wait_until)

NUM_WORKERS = 3
RESTART_SEC = 1  # services/flux-worker@.service says 5; shorter here only to keep the test quick
START = ROOT / "start_multi_gpu.sh"


class Supervised:
    """Runs one command and starts it again after a failure, like systemd's Restart=on-failure."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.args, self.env, self.log = args, env, log
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.exited_at: list[float] = []  # time.monotonic() when each run was reaped
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> "Supervised":
        self._thread.start()
        wait_until(lambda: self.proc is not None, 10, what=f"{self.args} to start")
        return self

    def _loop(self) -> None:
        while not self._stopping.is_set():
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
                self.starts += 1
            code = self.proc.wait()
            self.exited_at.append(time.monotonic())
            if code == 0 or self._stopping.is_set():
                return
            self._stopping.wait(RESTART_SEC)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        self._stopping.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self._thread.join(timeout)


class Cluster:
    def __init__(self, tmp: Path):
        self.base_port = free_port_block(NUM_WORKERS)
        self.ports = [self.base_port + i for i in range(NUM_WORKERS)]
        self.nginx_port = free_port()
        self.url = f"http://127.0.0.1:{self.nginx_port}"
        self.logs = tmp / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_") and k != "VIRTUAL_ENV"}
        env.update({
            "NUM_GPUS": str(NUM_WORKERS), "BASE_PORT": str(self.base_port), "NGINX_PORT": str(self.nginx_port),
            "NGINX_ADDR": "127.0.0.1", "FLUX_MODE": "bf16", "FLUX_DEVICE": "cpu", "FLUX_MODEL": "dummy:tiny",
            "FLUX_PYTHON": PYTHON, "FLUX_RUN_DIR": str(tmp / "run"), "FLUX_LOG_DIR": str(self.logs),
            "FLUX_OUTPUT_DIR": str(tmp / "outputs"), "NGINX_LOG_DIR": str(self.logs), "NO_COLOR": "1",
            "FLUX_WARMUP_SIZES": "256x256", "FLUX_WARMUP_STEPS": "1", "FLUX_DRAIN_TIMEOUT": "10",
        })
        self.env = env
        self.workers = [Supervised([str(START), "worker", str(i)], env, self.logs / f"unit-worker{i}.log")
                        for i in range(NUM_WORKERS)]
        self.nginx = Supervised([str(START), "nginx"], env, self.logs / "unit-nginx.log")
        self.client = httpx.Client(base_url=self.url, timeout=120)

    def start(self) -> None:
        for unit in (*self.workers, self.nginx):
            unit.start()
        for port in self.ports:
            wait_until(lambda p=port: healthy(f"http://127.0.0.1:{p}"), 180, 0.3, f"worker on port {port}")
        wait_until(lambda: healthy(self.url), 30, 0.2, "nginx")

    def stop(self) -> None:
        self.client.close()
        for unit in self.workers:
            unit.stop()
        self.nginx.stop(signal.SIGQUIT)

    def worker_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def log_tails(self) -> str:
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                         for p in sorted(self.logs.glob("*.log")))


@pytest.fixture(scope="module")
def cluster(workdir):
    if shutil.which("nginx") is None:
        pytest.fail("nginx is not installed: apt-get install nginx (./run_tests.sh installs it)")
    c = Cluster(workdir / "cluster")
    try:
        c.start()
    except BaseException:
        tails = c.log_tails()
        c.stop()
        pytest.fail(f"the cluster did not start:\n{tails}")
    yield c
    c.stop()


# ---- job routing -----------------------------------------------------------------------------------
def test_job_ids_reach_the_worker_that_owns_them(cluster):
    c = cluster
    with httpx.Client(base_url=c.url, timeout=60) as client:
        results = []
        threads = [threading.Thread(target=lambda: results.append(client.post("/jobs", json=QUICK_JOB)))
                   for _ in range(3 * NUM_WORKERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [r.status_code for r in results] == [202] * len(results), [r.text for r in results]
    ids = [r.json()["job_id"] for r in results]
    owners = {int(i.split("-")[0]) for i in ids}
    assert owners <= set(c.ports) and len(owners) >= 2, f"jobs did not spread: {owners}"

    for job_id in ids:  # every poll through nginx finds its job: none lands on a worker that never saw it
        view = wait_until(lambda j=job_id: _finished(c.client.get(f"/jobs/{j}")), 60, 0.1, f"job {job_id}")
        assert view["status"] == "succeeded", view
        image_url = view["result"]["image_url"]
        assert image_url.startswith(c.url + "/images/"), f"image_url must point at the proxy: {image_url}"
        image = c.client.get(httpx.URL(image_url).path)
        assert image.status_code == 200
        assert_png(image.content, 256, 256)
        events = sse_events(c.client.get(f"/jobs/{job_id}/events").text.splitlines())
        assert [name for name, _ in events][-2:] == ["succeeded", "done"]
        assert c.client.delete(f"/jobs/{job_id}").json()["status"] == "succeeded"

    unknown = c.client.get("/jobs/1-0123456789abcdef01234567")  # names no worker: nginx answers itself
    assert unknown.status_code == 404 and unknown.json()["error"]["code"]
    gone = c.client.get(f"/jobs/{c.ports[0]}-0123456789abcdef01234567")  # the owner answers for its own ids
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"


def _finished(resp: httpx.Response):
    assert resp.status_code == 200, f"a job poll through nginx got {resp.status_code}: {resp.text[:300]}"
    view = resp.json()
    return view if view["status"] not in ("queued", "running") else None


def test_running_job_streams_and_cancels_through_nginx(cluster):
    c = cluster
    job_id = c.client.post("/jobs", json=LONG_JOB).json()["job_id"]
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(_stream(f"{c.url}/jobs/{job_id}/events", lines)),
                              daemon=True)
    reader.start()
    # nginx must pass events on as they happen (no buffering): a step event arrives while the job runs
    wait_until(lambda: any('"status": "running"' in line and '"step": ' in line for line in lines), 60, 0.05,
               "a running event through nginx")
    assert c.client.get(f"/jobs/{job_id}").json()["status"] == "running"

    started = time.monotonic()
    resp = c.client.delete(f"/jobs/{job_id}")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled", resp.text
    assert time.monotonic() - started < 5
    reader.join(10)
    assert not reader.is_alive(), "the event stream did not end after the cancel"
    names = [name for name, _ in sse_events(lines)]
    assert names[-2:] == ["cancelled", "done"], names


def _stream(url: str, sink: list[str]) -> list[str]:
    with httpx.stream("GET", url, timeout=120) as resp:
        for line in resp.iter_lines():
            sink.append(line)
    return []


# ---- kill -9 under load ------------------------------------------------------------------------------
class Load:
    """Clients sending quick /generate requests through nginx until stopped; every answer is kept."""

    def __init__(self, url: str, clients: int):
        self.url = url
        self.results: list[dict] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while not self._stop.is_set():
                self.send(client, QUICK_JOB)

    def send(self, client: httpx.Client, body: dict) -> None:
        sent = time.monotonic()
        try:
            resp = client.post("/generate", json=body)
            result = {"sent": sent, "done": time.monotonic(), "status": resp.status_code,
                      "ctype": resp.headers.get("content-type", ""), "body": resp.text[:300]}
            if resp.status_code == 200:
                result["gpu"] = resp.json()["gpu"]
        except httpx.HTTPError as exc:
            result = {"sent": sent, "done": time.monotonic(), "status": None, "body": repr(exc)}
        self.results.append(result)

    def start(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)


@pytest.mark.timeout(240)
def test_kill_9_under_load_fails_only_the_victims_requests_and_it_comes_back(cluster):
    c = cluster
    victim = 1
    unit = c.workers[victim]
    old_pid = unit.proc.pid
    load = Load(c.url, clients=4).start()
    slow = Load(c.url, clients=0)
    slow_body = dict(LONG_JOB, width=768, height=768, num_inference_steps=20)  # a few seconds each
    slow_threads = [threading.Thread(target=slow.send, args=(httpx.Client(base_url=c.url, timeout=120), slow_body))
                    for _ in range(NUM_WORKERS)]
    try:
        for t in slow_threads:
            t.start()
        wait_until(lambda: httpx.get(f"{c.worker_url(victim)}/queue-stats", timeout=5).json()["running"] > 0, 30,
                   0.05, "work in flight on the victim")
        time.sleep(0.5)
        held = httpx.get(f"{c.worker_url(victim)}/queue-stats", timeout=5).json()
        killed = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        # The kernel takes a moment to tear a killed process down (its memory first, then its sockets):
        # until it is reaped, its sockets still take what nginx sends. "After the kill" starts when it is gone.
        wait_until(lambda: unit.exited_at, 10, what="the killed worker to be reaped")
        dead = unit.exited_at[0]
        # nginx learns of the death when it reads the victim's closed connections, and answers what the victim
        # held with 502 then. On a starved machine that can come after the reap: a POST that reached nginx in
        # between went down a kept-alive connection to the victim (and nginx never sends a POST twice), so it
        # was the victim's too. "After the kill" starts when nginx knew: the last of those 502s.
        def noticed() -> float:
            return max([dead] + [r["done"] for r in load.results + slow.results
                                 if r["status"] != 200 and r["sent"] < dead])

        # load goes on against the two others (the victim is restarting) until plenty was sent since
        wait_until(lambda: sum(r["sent"] > noticed() for r in load.results) >= 12, 90, 0.1,
                   "requests sent after the kill to be answered")
    finally:
        load.stop()
        for t in slow_threads:
            t.join(120)

    results = load.results + slow.results
    failed = [r for r in results if r["status"] != 200]
    known = noticed()
    after_kill = [r for r in results if r["sent"] > known]
    assert failed, "nothing was in flight on the victim: the test proved nothing"
    assert after_kill and all(r["status"] == 200 for r in after_kill), \
        f"requests sent after the victim was gone failed (reaped at {dead:.3f}): " \
        f"{[r for r in after_kill if r['status'] != 200][:3]}\n{c.log_tails()}"
    for r in failed:
        assert r["sent"] < known, f"a request failed that the victim did not hold: {r}"
        assert r["status"] == 502 and r["ctype"].startswith("application/json") and '"bad_gateway"' in r["body"], r
        # from the moment the victim is gone: tearing a process down is the kernel's time (seconds on a busy
        # machine), the wait after it is nginx's (this also bounds `known` to 3 s after the reap)
        assert r["done"] - dead < 3, f"an in-flight request waited {r['done'] - dead:.1f} s for its error"
    # what the victim held a moment before the kill, plus at most one request per load client since
    assert len(failed) <= held["queued"] + held["running"] + 4, (held, failed)
    print(f"kill -9: {len(failed)} of {len(results)} requests failed (victim held {held['running']} running, "
          f"{held['queued']} queued; reaped {dead - killed:.3f} s after the signal); {len(after_kill)} sent "
          f"afterwards all succeeded")

    # supervision restarts it, and nginx sends it traffic again once it is healthy
    wait_until(lambda: unit.proc.pid != old_pid, 30, 0.1, "the victim to be restarted")
    wait_until(lambda: healthy(c.worker_url(victim)), 120, 0.3, "the restarted victim to be healthy")
    deadline = time.monotonic() + 60  # nginx's fail_timeout (30 s) plus margin
    with httpx.Client(base_url=c.url, timeout=60) as client:
        while time.monotonic() < deadline:
            resp = client.post("/generate", json=QUICK_JOB)
            assert resp.status_code == 200, resp.text
            if resp.json()["gpu"] == victim:
                break
            time.sleep(0.2)
        else:
            pytest.fail("nginx never sent traffic to the restarted worker")
