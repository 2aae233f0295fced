"""scripts/render_nginx.py: the shipped configs are its output, workers.json, and routing by worker id with a
real nginx in front of workers on two addresses (127.0.0.1 is this host, 127.0.0.2 stands for another one)."""
from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from scripts.render_nginx import (Options, RenderError, Worker, conf_listen_ports, key_id, parse_worker, render,
                                  shipped_config, workers_document, write_outputs)
from tests.integration.nginx_proc import EchoUpstream, Nginx, raw_request, split_response, world_readable_tmp
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
RENDERER = ROOT / "scripts" / "render_nginx.py"
pytestmark = pytest.mark.integration
needs_nginx = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")


def _eight(modes: list[str]) -> list[Worker]:
    return [Worker("127.0.0.1", 8000 + i, p) for i, p in enumerate(modes)]


@pytest.mark.parametrize(("conf", "modes"), [("nginx.conf", ["fp4"] * 8),
                                              ("nginx_mixed.conf", ["fp4"] * 4 + ["bf16"] * 4)])
def test_shipped_configs_are_the_renderers_defaults(conf, modes):
    assert render(_eight(modes), Options()) == (ROOT / conf).read_text()
    assert shipped_config(conf) == (ROOT / conf).read_text()  # what `start` compares an edited file with


def test_cli_renders_the_same_as_the_module():
    args = [a for i in range(8) for a in ("--worker", f"{8000 + i}:fp4")]
    out = subprocess.run([sys.executable, str(RENDERER), *args], capture_output=True, text=True, check=True).stdout
    assert out == (ROOT / "nginx.conf").read_text()


def test_workers_json_and_secret_config_modes(tmp_path):
    workers = [parse_worker("8000:fp4"), parse_worker("10.1.2.3:9000:bf16:gpu_b")]
    assert workers[1] == Worker("10.1.2.3", 9000, "bf16", "gpu_b")
    assert workers[1].local is False and workers[0].local is True
    out, doc = tmp_path / "nginx.conf", tmp_path / "workers.json"
    write_outputs(workers, Options(listen="127.0.0.1:8080"), out, doc)
    assert json.loads(doc.read_text()) == workers_document(workers, 8080) == {
        "workers": [{"id": "8000", "host": "127.0.0.1", "port": 8000, "precision": "fp4"},
                    {"id": "gpu_b", "host": "10.1.2.3", "port": 9000, "precision": "bf16"}],
        "nginx_port": 8080}
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    write_outputs(workers, Options(rate="5r/s", api_keys=["s3cret-key"]), out)
    text = out.read_text()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # holds the keys
    assert '"s3cret-key" ' + key_id("s3cret-key") in text


@pytest.mark.parametrize("bad", [
    lambda: render([Worker("127.0.0.1", 8000, "fp4"), Worker("127.0.0.2", 8000, "fp4")], Options()),  # same id
    lambda: Worker("127.0.0.1", 8000, "int8"),
    lambda: Worker("127.0.0.1", 8000, "fp4", id="a-b"),
    lambda: Worker("evil;host", 8000, "fp4"),
    lambda: render([Worker("127.0.0.1", 8000, "fp4")], Options(rate="lots")),
    lambda: render([Worker("127.0.0.1", 8000, "fp4")], Options(rate="1r/s", api_keys=['a"; }'])),
    lambda: render([Worker("127.0.0.1", 8000, "fp4")], Options(images_dir="/tmp/x; root /")),
    lambda: render([], Options()),
])
def test_bad_inputs_are_refused_in_words(bad):
    with pytest.raises(RenderError):
        bad()


def test_listen_ports_of_a_config():
    text = "server {\n  listen 127.0.0.1:8081;  # listen 9\n  listen [::1]:8082 ipv6only=on;\n  # listen 7;\n}\n"
    assert conf_listen_ports(text) == [8081, 8082]


@needs_nginx
def test_jobs_images_and_worker_probes_reach_the_owner_wherever_it_runs(tmp_path):
    """Worker "8000" is local, "far" runs on 127.0.0.2 (another host): an image named far-... is fetched from
    "far" even though a file of that name sits in the local folder; local images come from the folder."""
    out = world_readable_tmp(tmp_path)
    try:
        near_port, far_port, nginx_port = free_port(), free_port(), free_port()
        near, far = Worker("127.0.0.1", near_port, "fp4", "near"), Worker("127.0.0.2", far_port, "bf16", "far")
        name = "0123456789abcdef0123456789abcdef"
        (out / f"near-{name}.png").write_bytes(b"\x89PNG local")
        (out / f"far-{name}.png").write_bytes(b"\x89PNG stale local copy")
        (out / f"near-{'f' * 32}.webp").symlink_to("/etc/passwd")
        opts = Options(listen=f"127.0.0.1:{nginx_port}", images_dir=str(out), web_dir=str(ROOT / "web"))
        write_outputs([near, far], opts, tmp_path / "unused.conf", out / "workers.json")
        with EchoUpstream("127.0.0.1", near_port, "near"), EchoUpstream("127.0.0.2", far_port, "far"), \
                Nginx(tmp_path, [near, far], opts) as nginx:
            def get(path):
                try:
                    with urllib.request.urlopen(nginx.url + path, timeout=10) as r:
                        return r.status, r.headers, r.read()
                except urllib.error.HTTPError as e:
                    return e.code, e.headers, e.read()

            for job in ("near-1234", "far-1234"):
                status, _, body = get(f"/jobs/{job}")
                assert status == 200 and json.loads(body)["server"] == job.split("-")[0], body
            status, headers, body = get(f"/images/near-{name}.png")
            assert (status, body) == (200, b"\x89PNG local")
            assert headers["Content-Type"] == "image/png"
            assert headers["Cache-Control"] == "public, max-age=86400, immutable"
            assert headers["X-Request-ID"]
            status, _, body = get(f"/images/far-{name}.png")
            assert status == 200 and json.loads(body) == {**json.loads(body), "server": "far",
                                                           "path": f"/images/far-{name}.png"}
            assert get(f"/images/near-{'f' * 32}.webp")[0] == 404 or \
                json.loads(get(f"/images/near-{'f' * 32}.webp")[2]).get("server") == "near"  # never the link
            assert b"root:" not in get(f"/images/near-{'f' * 32}.webp")[2]
            for bad in ("/images/../../etc/passwd", "/images/near-x.png", "/images/nginx.conf", "/jobs/nobody-1"):
                status, headers, body = get(bad)
                assert status in (400, 404), (bad, status, body)
                assert json.loads(body)["error"]["code"], body
            status, _, body = get("/workers/far/health")
            assert json.loads(body)["server"] == "far" and json.loads(body)["path"] == "/health"
            assert json.loads(get("/workers/near/")[2])["path"] == "/"
            assert get("/workers/other/health")[0] == 404
            assert get("/workers/near/generate")[0] == 404
            status, headers, body = get("/dashboard/workers.json")
            assert status == 200 and json.loads(body) == {"workers": [{"id": w.id, "precision": w.precision}
                                                                      for w in (near, far)]}
            assert b"127.0.0.1" not in body and str(far.port).encode() not in body  # no address, no port
            assert headers["Cache-Control"] == "no-cache"
            status, _, body = get("/dashboard/nginx_status")
            assert status == 200 and b"Active connections" in body
            assert get("/ui/")[0] == 200
    finally:
        shutil.rmtree(out, ignore_errors=True)


@needs_nginx
def test_a_folder_under_an_image_name_is_no_image_and_no_redirect(tmp_path):
    """nginx answers a folder with a 301 to the name plus "/" (an HTML page naming nginx); under an image name it
    is no image: the owner is asked, as for a link or a miss, and its answer (here the echo) comes back."""
    out = world_readable_tmp(tmp_path)
    try:
        worker_port, nginx_port = free_port(), free_port()
        near = Worker("127.0.0.1", worker_port, "fp4", "near")
        name = f"near-{'a' * 32}.png"
        (out / name).mkdir()
        opts = Options(listen=f"127.0.0.1:{nginx_port}", images_dir=str(out), web_dir=str(ROOT / "web"))
        with EchoUpstream("127.0.0.1", worker_port, "near"), Nginx(tmp_path, [near], opts) as nginx:
            raw = raw_request(nginx.port, f"GET /images/{name} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                              .encode())
            status, headers, body = split_response(raw)
            assert status != 301 and "location" not in headers, raw[:400]
            assert b"nginx" not in raw.lower(), raw[:400]
            assert json.loads(body)["server"] == "near", body
    finally:
        shutil.rmtree(out, ignore_errors=True)
