"""LoRA affinity in nginx: a request naming adapters goes to the worker its first adapter's name hashes to (among
the pool's bf16/fp8 workers), so an adapter is loaded on one worker instead of on every one.

The routing is checked against nginx's own consistent hash (ketama, re-computed below), first with stand-in
upstreams for every body shape, then with real dummy:tiny workers serving real adapter files, where /loras and
the workers' adapter-load counters show what the routing saves."""
from __future__ import annotations

import json
import random
import re
import shutil
import time
import urllib.error
import urllib.request
import zlib
from bisect import bisect_left
from pathlib import Path

import pytest

from scripts.render_nginx import Options, Worker
from tests.integration.nginx_proc import EchoUpstream, Nginx, world_readable_tmp
from tests.ports import free_port

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")]


def chash_pick(addresses: list[str], key: str) -> str:
    """The server nginx's `hash KEY consistent` picks (ngx_http_upstream_hash_module.c): 160 points per server,
    each the CRC32 of "host\\0port" continued with the previous point; the key's CRC32 goes to the first point at
    or above it, wrapping around."""
    points = []
    for address in addresses:
        host, port = address.rsplit(":", 1)
        base = zlib.crc32(host.encode() + b"\0" + port.encode())
        prev = 0
        for _ in range(160):
            prev = zlib.crc32(prev.to_bytes(4, "little"), base)
            points.append((prev, address))
    points.sort()
    hashes = [h for h, _ in points]
    i = bisect_left(hashes, zlib.crc32(key.encode()))
    return points[i % len(points)][1]


def post(url: str, body: bytes | dict, headers: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def names_splitting(addresses: list[str], per_server: int, prefix: str) -> list[str]:
    """Adapter names the hash spreads evenly: per_server of them on each address (so a figure measured with them
    does not depend on the ports a run drew)."""
    picked: dict[str, list[str]] = {a: [] for a in addresses}
    n = 0
    while any(len(v) < per_server for v in picked.values()):
        name = f"{prefix}{n}"
        target = picked[chash_pick(addresses, name)]
        if len(target) < per_server:
            target.append(name)
        n += 1
    return [name for i in range(per_server) for name in (picked[a][i] for a in addresses)]


# ---------------------------------------------------------------------------------------------------------------
# Routing of every body shape, with stand-in upstreams: two bf16 workers and one fp4 worker (fp4 refuses adapters)

@pytest.fixture(scope="module")
def echo_fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("affinity-echo")
    workers = [Worker("127.0.0.1", free_port(), "bf16", "b1"), Worker("127.0.0.1", free_port(), "bf16", "b2"),
               Worker("127.0.0.1", free_port(), "fp4", "f")]
    ups = [EchoUpstream("127.0.0.1", w.port, w.id) for w in workers]
    for up in ups:
        up.__enter__()
    try:
        yield tmp, workers
    finally:
        for up in ups:
            up.__exit__()


def _server_of(nginx_url: str, path: str, body, headers=None) -> str:
    status, answer = post(nginx_url + path, body, headers, timeout=10)
    assert status == 200, answer
    return answer["server"]


def test_requests_with_adapters_follow_the_hash_of_the_first_name(echo_fleet):
    tmp, workers = echo_fleet
    by_address = {w.address: w.id for w in workers}
    lora_servers = [w.address for w in workers if w.precision != "fp4"]
    opts = Options(listen=f"127.0.0.1:{free_port()}", web_dir=str(tmp))
    (tmp / "on").mkdir()
    with Nginx(tmp / "on", workers, opts) as nginx:
        names = names_splitting(lora_servers, 3, "style-")
        for name in names:
            want = by_address[chash_pick(lora_servers, name)]
            shapes = [
                {"prompt": "x", "loras": [{"name": name, "scale": 0.8}]},
                {"loras": [{"scale": -1.5, "name": name}, {"name": "zzz"}], "prompt": "x"},
                f'{{ "prompt" : "x",\n "loras" :\n [ {{\n "name" : "{name}" }} ] }}'.encode(),
            ]
            for body in shapes:
                for path in ("/generate", "/jobs", "/v1/images/generations", "/generate/quality"):
                    assert _server_of(nginx.url, path, body) == want, (name, path, body)
        # only the first adapter counts: the second name does not move the request
        first = names[0]
        for other in names[1:]:
            body = {"prompt": "x", "loras": [{"name": first}, {"name": other}]}
            assert _server_of(nginx.url, "/generate", body) == by_address[chash_pick(lora_servers, first)]
        # the fast pool is fp4 only: it has no twin, adapters or not
        assert _server_of(nginx.url, "/generate/fast", {"prompt": "x", "loras": [{"name": first}]}) == "f"


def _spread(nginx_url: str, body, n: int = 6, path: str = "/generate") -> set[str]:
    return {_server_of(nginx_url, path, body) for _ in range(n)}


def test_everything_else_keeps_least_conn(echo_fleet):
    """Without a name the regex can read (no loras, an escaped name, a name only quoted in the prompt, a body too
    big for the memory buffer) sequential requests are spread over every worker, fp4 included."""
    tmp, workers = echo_fleet
    everyone = {w.id for w in workers}
    opts = Options(listen=f"127.0.0.1:{free_port()}", web_dir=str(tmp), max_body="2m")
    prefix = world_readable_tmp(tmp)  # the big body goes to a temp file that nginx's unprivileged worker writes
    try:
        _least_conn_cases(prefix, workers, opts, everyone)
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


def _least_conn_cases(prefix: Path, workers: list[Worker], opts: Options, everyone: set[str]) -> None:
    with Nginx(prefix, workers, opts) as nginx:
        for body in ({"prompt": "a lighthouse"},
                     {"prompt": "x", "loras": []},
                     {"prompt": "x", "loras": None},
                     {"prompt": 'say "loras": [{"name": "a"}]'},
                     b'{"prompt": "x", "loras": [{"name": "\\u0061bc"}]}',
                     {"prompt": "x" * 200_000, "loras": [{"name": "style-0"}]}):
            assert _spread(nginx.url, body) == everyone, body
        assert _spread(nginx.url, None, path="/jobs") == everyone  # GET /jobs: no body at all
        # a body made to make the regex work hard is answered at once
        hostile = b'{"prompt": "' + b'\\"loras\\":[{' * 4000 + b'", "loras": [{' + b' ' * 40_000 + b'"scale": 1}]}'
        started = time.monotonic()
        assert _spread(nginx.url, hostile, n=3) <= everyone
        assert time.monotonic() - started < 3


def test_an_idempotency_key_wins_over_the_adapter(echo_fleet):
    """A retry must reach the worker that holds the first answer, so the Idempotency-Key hash decides."""
    tmp, workers = echo_fleet
    every_server = [w.address for w in workers]
    lora_servers = [w.address for w in workers if w.precision != "fp4"]
    by_address = {w.address: w.id for w in workers}
    opts = Options(listen=f"127.0.0.1:{free_port()}", web_dir=str(tmp))
    (tmp / "idem").mkdir()
    with Nginx(tmp / "idem", workers, opts) as nginx:
        name = "style-0"
        lora_target = chash_pick(lora_servers, name)
        keys = [f"key-{i}" for i in range(40) if chash_pick(every_server, f"key-{i}") != lora_target][:4]
        for key in keys:
            for _ in range(2):
                got = _server_of(nginx.url, "/generate", {"prompt": "x", "loras": [{"name": name}]},
                                 {"Idempotency-Key": key})
                assert got == by_address[chash_pick(every_server, key)], key


def test_affinity_off_spreads_adapters_like_everything_else(echo_fleet):
    tmp, workers = echo_fleet
    opts = Options(listen=f"127.0.0.1:{free_port()}", web_dir=str(tmp), lora_affinity=False)
    (tmp / "off").mkdir()
    with Nginx(tmp / "off", workers, opts) as nginx:
        assert "flux_lora_key" not in nginx.conf.read_text()
        assert _spread(nginx.url, {"prompt": "x", "loras": [{"name": "style-0"}]}) == {w.id for w in workers}


# ---------------------------------------------------------------------------------------------------------------
# Real workers: two bf16 dummy:tiny workers sharing one adapter folder, an LRU of 3 adapters each

CACHE = 3
QUICK = {"width": 256, "height": 256, "num_inference_steps": 1, "seed": 1}


def _tiny_transformer():
    import torch
    from diffusers import FluxTransformer2DModel

    from models.dummy import SPECS

    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(SPECS["tiny"].transformer)


def _make_adapters(transformer, folder: Path, names: list[str]) -> None:
    from bench.lora_files import peft_adapter

    for i, name in enumerate(names):
        peft_adapter(transformer, folder / f"{name}.safetensors", rank=4, seed=i)


@pytest.fixture(scope="module")
def lora_fleet(tmp_path_factory):
    from tests.harness.process import Worker as Proc, start_all

    tmp = tmp_path_factory.mktemp("affinity-workers")
    folder = tmp / "loras"
    folder.mkdir()
    transformer = _tiny_transformer()  # the imports first: the workers' ports are free only until they start
    procs = [Proc(f"w{i}", tmp, {"FLUX_LORA_DIR": str(folder), "FLUX_LORA_CACHE": str(CACHE),
                                 "FLUX_LORA_MAX_RANK": "8"}, precision="bf16") for i in range(2)]
    servers = [Worker("127.0.0.1", p.port, "bf16") for p in procs]
    addresses = [s.address for s in servers]
    names = {"check": names_splitting(addresses, 2, "check-"), "off": names_splitting(addresses, 3, "mix-off-"),
             "on": names_splitting(addresses, 3, "mix-on-")}
    _make_adapters(transformer, folder, [n for group in names.values() for n in group])
    try:
        start_all(*procs, timeout=180, interval=0.1)
        yield tmp, procs, servers, names
    finally:
        for p in procs:
            p.kill()


def _worker_of(answer: dict) -> str:
    return answer["image_url"].rsplit("/", 1)[-1].split("-", 1)[0]


def _misses(proc) -> int:
    with urllib.request.urlopen(proc.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(int(float(m)) for m in re.findall(r"^flux_lora_misses_total(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M))


def _loaded(proc) -> set[str]:
    with urllib.request.urlopen(proc.url + "/loras", timeout=10) as r:
        return {a["name"] for a in json.loads(r.read())["data"] if a["loaded"]}


@pytest.mark.slow
def test_real_workers_load_each_adapter_where_it_is_routed(lora_fleet):
    tmp, procs, servers, names = lora_fleet
    by_address = {s.address: s.id for s in servers}
    addresses = [s.address for s in servers]
    opts = Options(listen=f"127.0.0.1:{free_port()}", web_dir=str(tmp))
    (tmp / "nginx-check").mkdir()
    with Nginx(tmp / "nginx-check", servers, opts) as nginx:
        routed: dict[str, str] = {}
        for name in names["check"]:
            for i in range(3):
                status, answer = post(nginx.url + "/generate",
                                      {"prompt": f"a boat {i}", **QUICK, "loras": [{"name": name, "scale": 0.8}]})
                assert status == 200, answer
                routed.setdefault(name, _worker_of(answer))
                assert _worker_of(answer) == routed[name], name  # every request of an adapter: one worker
            assert routed[name] == by_address[chash_pick(addresses, name)]
        assert set(routed.values()) == {s.id for s in servers}
        for proc, server in zip(procs, servers):
            assert _loaded(proc) == {n for n, w in routed.items() if w == server.id}
        seen = set()
        for i in range(4):
            status, answer = post(nginx.url + "/generate", {"prompt": f"no adapter {i}", **QUICK})
            assert status == 200, answer
            seen.add(_worker_of(answer))
        assert seen == {s.id for s in servers}


def _mix(names: list[str]) -> list[str]:
    """24 requests over 6 adapters, each adapter 4 times, in a fixed shuffled order."""
    order = [n for n in names for _ in range(4)]
    random.Random(7).shuffle(order)
    return order


@pytest.mark.slow
def test_adapter_loads_across_the_fleet_with_and_without_affinity(lora_fleet):
    """The same mix of 24 requests over 6 adapters (3 per worker by the hash), each worker caching 3: loads
    counted by the workers' flux_lora_misses_total."""
    tmp, procs, servers, names = lora_fleet
    loads = {}
    for mode, affinity in (("off", False), ("on", True)):
        opts = Options(listen=f"127.0.0.1:{free_port()}", web_dir=str(tmp), lora_affinity=affinity)
        (tmp / f"nginx-{mode}").mkdir()
        with Nginx(tmp / f"nginx-{mode}", servers, opts) as nginx:
            before = sum(_misses(p) for p in procs)
            for i, name in enumerate(_mix(names[mode])):
                status, answer = post(nginx.url + "/generate", {"prompt": f"mix {i}", **QUICK,
                                                                "loras": [{"name": name}]})
                assert status == 200, answer
            loads[mode] = sum(_misses(p) for p in procs) - before
    print(f"\nadapter loads for 24 requests over 6 adapters, 2 workers caching {CACHE} each: "
          f"least_conn {loads['off']}, affinity {loads['on']}")
    assert loads["on"] == 6  # each adapter once, on its worker, and never evicted
    assert loads["off"] > 2 * loads["on"]
