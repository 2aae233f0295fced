#!/usr/bin/env python3
"""A fleet of GPU hosts behind one nginx gateway: the inventory, its workers, and the fleet's status.

The inventory (fleet.conf) has one line per GPU host, as that host runs `./start_multi_gpu.sh start --workers-only`:

    # ADDRESS      BASE_PORT  NUM_WORKERS  [MODES]
    10.0.0.5       8000       8            fp4
    10.0.0.6       8000       8            mixed
    gpu7.internal  9000       4            fp4,fp4,bf16,bf16

ADDRESS is the address the host's workers bind (its FLUX_HOST) and the gateway reaches them on; worker i of a host
listens on BASE_PORT+i; MODES is what `-m` takes (fp4 | bf16 | fp8 | mixed | one precision per worker, comma-
separated; default fp4). `#` starts a comment; blank lines are ignored.

Every worker's id - the prefix of its job ids and image names, FLUX_WORKER_ID - is `h<ADDRESS>_<PORT>` with every
character other than a letter or digit as `_` (10.0.0.5:8001 -> h10_0_0_5_8001): unique across the fleet and
derived the same way here (for the gateway's routes) and by start_multi_gpu.sh (for the workers it starts), from
ADDRESS as written, which is the host's FLUX_HOST.

    fleet.py check -f FILE                         validate; print one line per host
    fleet.py workers-json -f FILE --out PATH       the workers as render_nginx.py --workers-file takes them
    fleet.py status -f FILE [--gateway URL] [--marker TOKEN]
                                                   per host, per worker and totals; exit 0 all ready, 1 not
                                                   (a worker not ready, a wrong worker id, or the gateway down)

Standard library only (no jinja2): runs on a bare python3.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import re
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from render_nginx import PRECISIONS, RenderError, Worker  # noqa: E402

HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                         r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
MAX_WORKERS_PER_HOST = 64
MAX_ID_LENGTH = 64  # scripts/render_nginx.py WORKER_ID_RE
DIGITS_RE = re.compile(r"^[0-9]+$")  # str.isdigit() would take "８０００" and "²"


class FleetError(ValueError):
    """A bad inventory, naming the file and line."""


def worker_id(address: str, port: int) -> str:
    """h<address>_<port>, every character other than a letter or digit as "_" (start_multi_gpu.sh's rule too)."""
    return "h" + re.sub(r"[^A-Za-z0-9]", "_", address.strip("[]")) + f"_{int(port)}"


def expand_modes(spec: str, count: int) -> list[str]:
    """-m's rule (scripts/lib.sh expand_modes): one precision for all, mixed (first half fp4), or one per worker."""
    if spec in PRECISIONS:
        return [spec] * count
    if spec == "mixed":
        fast = (count + 1) // 2
        return ["fp4"] * fast + ["bf16"] * (count - fast)
    if "," in spec:
        modes = spec.split(",")
        unknown = [m for m in modes if m not in PRECISIONS]
        if unknown:
            raise ValueError(f"unknown precision {unknown[0]!r} in {spec!r} (fp4, bf16, fp8)")
        if len(modes) != count:
            raise ValueError(f"{spec!r} names {len(modes)} precisions for {count} workers")
        return modes
    raise ValueError(f"unknown mode {spec!r}: fp4, bf16, fp8, mixed or one per worker like fp4,fp4,bf16")


def check_address(address: str) -> tuple[str, str]:
    """An IPv4/IPv6 address (brackets optional) or a DNS name; never a wildcard (it names no host to reach).

    Returns (the address as written, without brackets; the host it names). The first is what the host's
    FLUX_HOST holds, so the worker ids derive from it as start_multi_gpu.sh derives them there (fd00:0::7 stays
    fd00:0::7: h..._fd00_0__7_...); the second (the canonical IP, or the lower-case name: DNS ignores case) tells
    two spellings of one host apart from two hosts."""
    bare = address[1:-1] if address.startswith("[") and address.endswith("]") else address
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        if not HOSTNAME_RE.match(bare) or bare.replace(".", "").isdigit():
            raise ValueError(f"{address!r} is neither an IP address nor a host name") from None
        return bare, bare.lower()
    if ip.is_unspecified:
        raise ValueError(f"{address} is a wildcard, not a host: give the address its workers bind (FLUX_HOST)")
    if ip.is_multicast or (ip.version == 4 and ip == ipaddress.IPv4Address("255.255.255.255")):
        raise ValueError(f"{address} is a multicast or broadcast address, not a host")
    return bare, str(getattr(ip, "ipv4_mapped", None) or ip)


@dataclass
class Host:
    address: str
    base_port: int
    num_workers: int
    modes: list[str]
    line: int
    workers: list[Worker] = field(default_factory=list)


def parse_inventory(text: str, source: str = "fleet.conf") -> list[Host]:
    hosts: list[Host] = []
    seen_ids: dict[str, int] = {}
    seen_addr: dict[tuple[str, int], int] = {}
    # Lines end at "\n" only (as editors, sed and grep count them), fields are separated by spaces and tabs;
    # anything else that is not printable ASCII is refused, naming the line, rather than read some other way.
    for n, raw in enumerate(text.removeprefix("\ufeff").split("\n"), 1):
        line = raw.split("#", 1)[0].strip(" \t\r")
        if not line:
            continue
        where = f"{source} line {n}"
        odd = re.search(r"[^\x20-\x7e\t]", line)
        if odd:
            raise FleetError(f"{where}: character {odd.group()!r} (U+{ord(odd.group()):04X}) at column "
                             f"{odd.start() + 1}: only printable ASCII, fields separated by spaces or tabs")
        parts = re.split(r"[ \t]+", line)
        if not 3 <= len(parts) <= 4:
            raise FleetError(f"{where}: expected ADDRESS BASE_PORT NUM_WORKERS [MODES], got {len(parts)} fields")
        try:
            address, host_key = check_address(parts[0])
        except ValueError as exc:
            raise FleetError(f"{where}: {exc}") from None
        if not DIGITS_RE.match(parts[1]) or not 1 <= int(parts[1]) <= 65535:
            raise FleetError(f"{where}: BASE_PORT {parts[1]!r} is not a port (1-65535)")
        if not DIGITS_RE.match(parts[2]) or not 1 <= int(parts[2]) <= MAX_WORKERS_PER_HOST:
            raise FleetError(f"{where}: NUM_WORKERS {parts[2]!r} is not a number from 1 to {MAX_WORKERS_PER_HOST}")
        base, count = int(parts[1]), int(parts[2])
        if base + count - 1 > 65535:
            raise FleetError(f"{where}: ports {base}-{base + count - 1} go past 65535")
        try:
            modes = expand_modes(parts[3] if len(parts) == 4 else "fp4", count)
        except ValueError as exc:
            raise FleetError(f"{where}: {exc}") from None
        host = Host(address, base, count, modes, n)
        for i, prec in enumerate(modes):
            port = base + i
            if (host_key, port) in seen_addr:
                raise FleetError(f"{where}: {address} port {port} is already a worker of line "
                                 f"{seen_addr[host_key, port]}")
            wid = worker_id(address, port)
            if len(wid) > MAX_ID_LENGTH:
                raise FleetError(f"{where}: the worker id of {address}:{port}, {wid}, would be {len(wid)} characters "
                                 f"(at most {MAX_ID_LENGTH}): list the host by a shorter name or its IP address")
            if wid in seen_ids:
                raise FleetError(f"{where}: worker id {wid} (of {address}:{port}) is already a worker of line "
                                 f"{seen_ids[wid]}: addresses that differ only in punctuation collide")
            try:
                host.workers.append(Worker(address, port, prec, wid, local=False))
            except RenderError as exc:
                raise FleetError(f"{where}: {exc}") from None
            seen_addr[host_key, port] = n
            seen_ids[wid] = n
        hosts.append(host)
    if not hosts:
        raise FleetError(f"{source}: no hosts (one line per host: ADDRESS BASE_PORT NUM_WORKERS [MODES])")
    return hosts


def load_inventory(path: str) -> list[Host]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FleetError(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_inventory(text, path)


def all_workers(hosts: list[Host]) -> list[Worker]:
    return [w for h in hosts for w in h.workers]


def _local_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether this machine holds the address (it can bind it)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET) as s:
            s.bind((str(ip), 0))
    except OSError:
        return False
    return True


def check_gateway(hosts: list[Host], source: str, addr: str, port: int) -> None:
    """A worker listed at the gateway's own address and port would have nginx send requests to itself, round
    and round until the connection limit answers 429 (found before nginx starts, not by the users). Workers
    named by a DNS name are not resolved here."""
    bare = addr.strip("[]")
    wildcard = bare in ("", "0.0.0.0", "::")
    for h in hosts:
        for w in h.workers:
            if w.port != port:
                continue
            try:
                ip = ipaddress.ip_address("127.0.0.1" if w.host.lower() == "localhost" else w.host)
            except ValueError:
                continue
            # listening on every address, the gateway is every address this machine holds (loopback included)
            if _local_address(ip) if wildcard else ip.compressed == bare:
                raise FleetError(f"{source} line {h.line}: worker {w.address} is the gateway itself (it listens on "
                                 f"{addr or 'every address'} port {port}): nginx would send requests to itself; "
                                 "give the gateway another NGINX_PORT")


# ---------------------------------------------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------------------------------------------
def _get_json(url: str, timeout: float = 2.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, _as_dict(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, _as_dict(exc.read())
    except (OSError, ValueError):
        return 0, {}


def _as_dict(raw: bytes) -> dict:
    try:
        doc = json.loads(raw)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _clean(value) -> str:
    """A worker's text on one line, without control characters (nothing reaches the terminal as an escape)."""
    return re.sub(r"[\x00-\x1f\x7f]", " ", str(value))[:40]


def _num(value) -> str:
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def probe(w: Worker) -> dict:
    base = f"http://{w.address}"
    code, health = _get_json(f"{base}/health")
    if code == 0:
        return {"state": "down"}
    state = _clean(health.get("status") or ("ready" if code == 200 else f"http{code}"))
    _, info = _get_json(f"{base}/")
    _, stats = _get_json(f"{base}/queue-stats")
    return {"state": state, "id": _clean(info.get("worker_id", "")), "precision": _clean(info.get("precision", "")),
            **{k: stats.get(k) for k in ("queued", "running", "completed", "failed", "seconds_per_image",
                                         "images_last_minute")}}


def gateway_state(url: str | None, marker: str | None) -> str:
    """up (our gateway answers /nginx-health with its token), not-ours, down, or "" when none is configured."""
    if not url:
        return ""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/nginx-health", timeout=2) as resp:
            body = resp.read().decode(errors="replace").strip()
    except (OSError, ValueError):
        return "down"
    return "up" if marker is None or body == f"flux-nginx {marker}" else "not-ours"


def status(hosts: list[Host], gateway: str | None = None, marker: str | None = None, out=sys.stdout) -> int:
    workers = all_workers(hosts)
    with ThreadPoolExecutor(max_workers=min(32, len(workers))) as pool:
        results = dict(zip([w.id for w in workers], pool.map(probe, workers)))
    gw = gateway_state(gateway, marker)
    problems = 0
    # columns as wide as the longest address and id (IPv6 addresses and host names run long)
    host_w = max([22] + [len(h.address) for h in hosts])
    id_w = max([24] + [len(w.id) for w in workers])
    row = "{:<%d} {:<%d} {:<6} {:<6} {:<9} {:>6} {:>7} {:>9} {:>6} {:>7}" % (host_w, id_w)
    print(f"FLUX fleet {time.strftime('%F %T')}: {len(hosts)} hosts, {len(workers)} workers", file=out)
    print(row.format("HOST", "WORKER", "PORT", "PREC", "STATE", "QUEUED", "RUNNING", "COMPLETED", "FAILED",
                     "S/IMAGE"), file=out)
    totals = {"ready": 0, "queued": 0, "running": 0, "completed": 0, "failed": 0, "per_min": 0}
    host_lines = []
    for h in hosts:
        ready = 0
        for w in h.workers:
            r = results[w.id]
            state = r["state"]
            if state == "ready" and r.get("id") and r["id"] != w.id:
                # routes by id would miss it: its FLUX_WORKER_ID is not the one the gateway derives
                state = "wrong-id"
            if state == "ready":
                ready += 1
            else:
                problems += 1
            prec = r.get("precision") or w.precision
            if prec != w.precision:
                prec = f"{prec}!"  # serves another precision than the inventory says
            print(row.format(h.address, w.id, w.port, prec, state, _num(r.get("queued")), _num(r.get("running")),
                             _num(r.get("completed")), _num(r.get("failed")), _num(r.get("seconds_per_image"))),
                  file=out)
            if state == "wrong-id":
                print(f"    worker at {w.address} reports id {r['id']!r}; the gateway routes {w.id!r}: start it with "
                      "./start_multi_gpu.sh start --workers-only and FLUX_HOST set to the inventory's address",
                      file=out)
            for key in ("queued", "running", "completed", "failed"):
                if isinstance(r.get(key), int):
                    totals[key] += r[key]
            if isinstance(r.get("images_last_minute"), int):
                totals["per_min"] += r["images_last_minute"]
        totals["ready"] += ready
        host_lines.append((f"host {h.address} (line {h.line}): {ready}/{len(h.workers)} ready", ready))
    print(file=out)
    for line, ready in host_lines:
        # a host down costs its share only while another host has a ready worker to take it
        down = "" if ready else ("  DOWN: the gateway sends its share to the other hosts" if totals["ready"]
                                 else "  DOWN")
        print(line + down, file=out)
    if not totals["ready"]:
        print("no worker of the fleet is ready: the gateway answers every request with 502 until one is", file=out)
    if gw:
        if gw != "up":
            problems += 1
        print(f"gateway: {gw} ({gateway})", file=out)
    print(f"TOTAL: {totals['ready']}/{len(workers)} ready on {sum(1 for h in hosts if any(results[w.id]['state'] == 'ready' for w in h.workers))}/{len(hosts)} hosts"
          f"  queued {totals['queued']}  running {totals['running']}  completed {totals['completed']}"
          f"  failed {totals['failed']}  rate {totals['per_min']} images/min", file=out)
    return 0 if problems == 0 else 1


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("check", "workers-json", "status"):
        p = sub.add_parser(name)
        p.add_argument("-f", "--fleet", required=True, help="the inventory file")
        if name == "workers-json":
            p.add_argument("--out", required=True)
        if name == "check":
            p.add_argument("--gateway-port", type=int, help="refuse workers at the gateway's own address and port")
            p.add_argument("--gateway-addr", default="", help="the address the gateway listens on (default: all)")
        if name == "status":
            p.add_argument("--gateway", help="the gateway's URL, e.g. http://127.0.0.1:80")
            p.add_argument("--marker", help="the token the gateway answers at /nginx-health")
    args = ap.parse_args(argv)
    try:
        hosts = load_inventory(args.fleet)
        if args.cmd == "check" and args.gateway_port:
            check_gateway(hosts, args.fleet, args.gateway_addr, args.gateway_port)
    except FleetError as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return 2
    if args.cmd == "check":
        for h in hosts:
            print(f"{h.address} ports {h.base_port}-{h.base_port + h.num_workers - 1} ({' '.join(h.modes)})")
        return 0
    if args.cmd == "workers-json":
        Path(args.out).write_text(json.dumps([w.as_dict() for w in all_workers(hosts)], indent=2) + "\n")
        return 0
    return status(hosts, args.gateway, args.marker)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
