#!/usr/bin/env python3
"""Renders the nginx config (deploy/nginx/flux.conf.j2) and workers.json for a FLUX fleet.

Bash orchestrates (start_multi_gpu.sh), this module renders. Workers are (host, port, precision, id) records,
so one config can front workers on several hosts: job ids and image names start with their worker's id
("8003-..."), and nginx routes /jobs/{id}..., /images/{name} and /workers/{id}/... to the owner by that prefix.

As a module (tests, a fleet gateway):

    from scripts.render_nginx import Worker, Options, render, workers_document, write_outputs
    text = render([Worker("10.0.0.5", 8000, "fp4"), Worker("10.0.0.6", 8000, "bf16", id="b0")], Options(listen="80"))

As a program (start_multi_gpu.sh):

    render_nginx.py --listen 127.0.0.1:8080 --worker 8000:fp4 --worker 10.0.0.6:8000:bf16:b0 \\
        [--images-dir DIR] [--web-dir DIR] [--rate 10r/s] [--burst 20] [--max-body 1m] \\
        [--read-timeout 600s] [--user nobody] [--headers-more auto|off|PATH] [--marker TOKEN] \\
        [--max-fails 3] [--fail-timeout 30s] [--workers-file FILE] \\
        [--resolver "ADDR [valid=10s]"] [--pid FILE] [--temp-dir DIR] [--lora-affinity on|off]
        [--out FILE [--workers-json-out FILE]]

    --workers-file FILE  a JSON list of {"host", "port", "precision", "id"} (deploy/kubernetes/gateway_workers.py
                         prints one), added to the --worker ones
    --max-fails N / --fail-timeout T  passive health of the pools: N failed attempts within T take a worker out
                         of rotation for T, after which nginx tries it again (a host back up rejoins by itself)
    --resolver R         workers by DNS name, re-resolved while running (`resolve`, nginx >= 1.27.3)
    --pid / --temp-dir   where the pid file and temp folders go (a read-only prefix: /tmp in a container)
    --lora-affinity      on (default): a request naming LoRA adapters goes to the worker its first adapter hashes
                         to, among the pool's bf16/fp8 workers (fp4 refuses adapters); off: least_conn for all
    render_nginx.py shipped [--write] DIR  # names the shipped nginx.conf / nginx_mixed.conf in DIR that differ
                                         # from their render (--write: renders them again)
    render_nginx.py listen-port FILE     # prints the ports of FILE's `listen`s, includes read (for -c checks)
    render_nginx.py json-get KEY...      # reads JSON on stdin, prints each KEY's value on its own line
                                         # (a dotted KEY such as progress.phase reads into objects)

API keys for the rate-limit map come from FLUX_API_KEYS (comma-separated) and FLUX_API_KEY_FILE (one per line),
as the worker reads them. A config that holds keys is written with mode 0600.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path


PROJECT_DIR = Path(__file__).resolve().parents[1]
TEMPLATE = PROJECT_DIR / "deploy" / "nginx" / "flux.conf.j2"
PRECISIONS = ("fp4", "bf16", "fp8")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
HEADERS_MORE_PATHS = ("/usr/lib/nginx/modules/ngx_http_headers_more_filter_module.so",
                      "/usr/lib64/nginx/modules/ngx_http_headers_more_filter_module.so")
WORKER_ID_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")  # api/settings.py: letters, digits and underscores
RATE_RE = re.compile(r"^[1-9][0-9]*r/[sm]$")
SIZE_RE = re.compile(r"^[0-9]+[kKmMgG]?$")
TIME_RE = re.compile(r"^[0-9]+(ms|s|m|h)?$")
# A key goes into the config between double quotes: anything that could end the string or start a variable
# is refused rather than escaped.
KEY_RE = re.compile(r"^[\x21\x23\x25-\x3a\x3c-\x5b\x5d-\x7a\x7c\x7e]{1,512}$")  # printable, no "$;\{}
MAP_SPECIAL = {"default", "hostnames", "include", "volatile"}

# Every error nginx itself produces, as docs/API.md's JSON error. (status, code, message, retryable, Retry-After)
ERRORS = (
    (400, "bad_request", "the request could not be parsed", "false", None),
    (403, "forbidden", "not allowed from this address", "false", None),
    (404, "not_found", "no such resource", "false", None),
    (405, "method_not_allowed", "method not allowed on this path", "false", None),
    (408, "request_timeout", "the request did not arrive in time", "true", None),
    (412, "precondition_failed", "a condition of the request (If-Match, If-Unmodified-Since) does not hold",
     "false", None),
    (413, "payload_too_large", "request body too large", "false", None),
    (414, "uri_too_long", "request URI too long", "false", None),
    (416, "range_not_satisfiable", "the requested range is outside the file", "false", None),
    (429, "rate_limited", "too many requests for this key or address", "true", 1),
    (431, "header_too_large", "request headers too large", "false", None),
    (500, "internal_error", "internal error in the proxy", "true", None),
    (501, "not_implemented", "method or transfer encoding not supported", "false", None),
    (502, "bad_gateway", "no worker could answer; retry shortly", "true", 1),
    (503, "unavailable", "service unavailable; retry shortly", "true", 1),
    (504, "gateway_timeout", "the worker did not answer in time", "true", None),
    (505, "http_version_not_supported", "HTTP version not supported: use HTTP/1.1 or HTTP/1.0", "false", None),
)
# nginx's own codes for "header too large" (494) map onto the standard 431.
ERROR_PAGES = tuple((s, s) for s, *_ in ERRORS if s != 431) + ((494, 431),)


class RenderError(ValueError):
    """A bad input, said in words a user can act on."""


@dataclass(frozen=True)
class Worker:
    host: str
    port: int
    precision: str
    id: str = ""          # job-id / image-name prefix; default: the port (api/settings.py job_prefix)
    local: bool | None = None  # images on this host's disk; default: host is a loopback address

    def __post_init__(self):
        if not self.id:
            object.__setattr__(self, "id", str(self.port))
        if self.local is None:
            object.__setattr__(self, "local", self.host in LOCAL_HOSTS)
        if not WORKER_ID_RE.match(self.id):
            raise RenderError(f"worker id {self.id!r}: letters, digits and underscores only")
        if self.precision not in PRECISIONS:
            raise RenderError(f"worker {self.id}: unknown precision {self.precision!r} ({', '.join(PRECISIONS)})")
        if not 0 < int(self.port) < 65536:
            raise RenderError(f"worker {self.id}: port {self.port} out of range")
        if not re.match(r"^[A-Za-z0-9.:\[\]-]+$", self.host):
            raise RenderError(f"worker {self.id}: bad host {self.host!r}")

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    def as_dict(self) -> dict:
        return {"id": self.id, "host": self.host, "port": int(self.port), "precision": self.precision}


@dataclass
class Options:
    listen: str = "80"                   # port or addr:port
    images_dir: str | None = None        # absolute folder: local workers' images from disk; None: proxied
    web_dir: str = "web"                 # holds ui/ and dashboard/; relative paths are relative to nginx's prefix
    rate: str | None = None              # e.g. 10r/s; None: no rate limit
    burst: int = 20
    max_body: str = "1m"
    read_timeout: str = "600s"
    api_keys: list[str] = field(default_factory=list)
    user: str | None = None              # `user` directive (nginx started as root)
    headers_more: str | None = None      # path of ngx_http_headers_more_filter_module.so: hides `Server`
    marker: str = "flux"                 # answered at /nginx-health: proves the nginx on the port is ours
    worker_connections: int = 8192      # per nginx worker process (one per core)
    conn_per_addr: int = 256
    max_fails: int = 3                   # passive health: failures within fail_timeout that take a worker out
    fail_timeout: str = "30s"            # ... and for how long before nginx tries it again
    resolver: str | None = None          # "ADDR [valid=10s] ...": servers re-resolved (`resolve`)
    pid: str | None = None               # `pid` directive; None: the -g/-p default
    temp_dir: str | None = None          # folder of nginx's temp paths; None: relative to the prefix
    lora_affinity: bool = True           # hash requests with adapters to the worker that holds the first one


def key_id(key: str) -> str:
    """The worker's name for a key (api/middleware.py): never the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def read_api_keys(environ=os.environ) -> list[str]:
    """The keys the workers accept, read as api/settings.py reads them."""
    keys = {k.strip() for k in environ.get("FLUX_API_KEYS", "").split(",") if k.strip()}
    path = environ.get("FLUX_API_KEY_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                keys |= {line.strip() for line in fh if line.strip() and not line.startswith("#")}
        except OSError as exc:
            raise RenderError(f"FLUX_API_KEY_FILE {path}: {exc.strerror}") from exc
    return sorted(keys)


def find_headers_more() -> str | None:
    return next((p for p in HEADERS_MORE_PATHS if os.path.isfile(p)), None)


def _pools(workers: list[Worker], lora_affinity: bool = True) -> tuple[list[dict], str, str]:
    present = [p for p in PRECISIONS if any(w.precision == p for w in workers)]
    pools = [{"name": "flux_api_backend", "zone": "256k", "workers": workers, "comment": True}]
    for p in present:
        pools.append({"name": f"flux_{p}_backend", "zone": "64k",
                      "workers": [w for w in workers if w.precision == p], "comment": False})
    # A pool's LoRA twin hashes over the workers that serve adapters: fp4 workers refuse them (422), so a
    # request with adapters never lands on one when the pool has another kind.
    for pool in pools:
        pool["lora_workers"] = [w for w in pool["workers"] if w.precision != "fp4"] if lora_affinity else []
    # Fast path: fp8 where present (fastest on H100), else fp4. Quality: bf16. Else everyone.
    fast = next((f"flux_{p}_backend" for p in ("fp8", "fp4") if p in present), "flux_api_backend")
    quality = "flux_bf16_backend" if "bf16" in present else "flux_api_backend"
    return pools, fast, quality


def render(workers: list[Worker], opts: Options) -> str:
    if not workers:
        raise RenderError("no workers to balance")
    ids = [w.id for w in workers]
    if len(set(ids)) != len(ids):
        raise RenderError(f"worker ids must be unique, got {ids}")
    if opts.rate and not RATE_RE.match(opts.rate):
        raise RenderError(f"rate limit {opts.rate!r}: use a number of requests per second or minute, e.g. 10r/s")
    if not SIZE_RE.match(opts.max_body):
        raise RenderError(f"body limit {opts.max_body!r}: a size such as 1m or 512k")
    if not TIME_RE.match(opts.read_timeout):
        raise RenderError(f"read timeout {opts.read_timeout!r}: a time such as 600s")
    if not re.match(r"^[A-Za-z0-9.:\[\]]+$", opts.listen):
        raise RenderError(f"listen {opts.listen!r}: a port or address:port")
    if not (isinstance(opts.max_fails, int) and 0 <= opts.max_fails <= 100):
        raise RenderError(f"max_fails {opts.max_fails!r}: a number from 0 (never out of rotation) to 100")
    if not re.match(r"^[1-9][0-9]*(ms|s|m|h)?$", opts.fail_timeout):
        raise RenderError(f"fail timeout {opts.fail_timeout!r}: a time such as 30s")
    if opts.resolver is not None and not re.match(r"^[A-Za-z0-9.:\[\]=_-]+( [A-Za-z0-9.:\[\]=_-]+)*$", opts.resolver):
        raise RenderError(f"resolver {opts.resolver!r}: addresses and options such as valid=10s, space-separated")
    if not re.match(r"^[A-Za-z0-9_-]{1,64}$", opts.marker):
        raise RenderError(f"marker {opts.marker!r}: letters, digits, - and _ only")
    for path in (opts.images_dir, opts.web_dir, opts.headers_more, opts.pid, opts.temp_dir):
        if path and not re.match(r"^[^\s\"';{}$\\]+$", path):
            raise RenderError(f"path {path!r}: spaces, quotes, $, ; and braces are not allowed in nginx paths")
    keys = []
    for key in opts.api_keys:
        if not KEY_RE.match(key):
            raise RenderError(f"API key {key_id(key)} (sha256 prefix) has a space, quote, $, ;, \\ or brace; "
                              "nginx's rate-limit map cannot hold it: use printable ASCII without those")
        quoted = "\\" + key if key.startswith("~") or key in MAP_SPECIAL else key
        keys.append((quoted, key_id(key)))
    if not isinstance(opts.lora_affinity, bool):
        raise RenderError(f"lora_affinity {opts.lora_affinity!r}: true or false")
    pools, fast, quality = _pools(workers, opts.lora_affinity)
    if opts.rate:
        limit = "limit_req zone=flux_per_key;" if opts.burst == 0 else \
            f"limit_req zone=flux_per_key burst={opts.burst} nodelay;"  # nginx refuses burst=0
    else:
        limit = ""
    import jinja2  # here, so json-get and listen-port run on a bare python3

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE.parent)), autoescape=False,
                             keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    # workers.json is served from the config itself: nginx's unprivileged workers may not be able to read the
    # run folder (a 0700 home), and the list changes only when the config is rendered again anyway.
    workers_inline = json.dumps(public_workers_document(workers), separators=(",", ":"))
    if re.search(r"['$\\]", workers_inline):
        raise RenderError("a worker's host, id or precision holds a quote, $ or backslash")
    errors = [{"status": s, "code": c, "message": m, "retryable": r, "retry_after": ra} for s, c, m, r, ra in ERRORS]
    return env.get_template(TEMPLATE.name).render(
        workers=workers, pools=pools, fast_pool=fast, quality_pool=quality, listen=opts.listen,
        images_dir=(opts.images_dir or "").rstrip("/") or None, web_dir=opts.web_dir.rstrip("/"),
        workers_inline=workers_inline, rate=opts.rate, limit=limit, max_body=opts.max_body,
        read_timeout=opts.read_timeout, api_keys=keys, user=opts.user, headers_more=opts.headers_more,
        marker=opts.marker, worker_connections=opts.worker_connections, conn_per_addr=opts.conn_per_addr,
        errors=errors, error_pages=ERROR_PAGES, max_fails=opts.max_fails, fail_timeout=opts.fail_timeout,
        resolver=opts.resolver, resolve=" resolve" if opts.resolver else "", pid=opts.pid,
        temp_prefix=(opts.temp_dir.rstrip("/") + "/") if opts.temp_dir else "",
        lora_affinity=any(pool["lora_workers"] for pool in pools))


def listen_port(listen: str) -> int:
    return int(listen.rsplit(":", 1)[-1])


def workers_document(workers: list[Worker], nginx_port: int) -> dict:
    """The operators' list (written next to the config): every worker's address too."""
    return {"workers": [w.as_dict() for w in workers], "nginx_port": int(nginx_port)}


# The configs at the repository's top: the renderer's defaults for 8 GPUs on ports 8000-8007 (paths relative to
# nginx's prefix, images proxied to the workers, no API keys). A test checks the files are this; `start` warns
# when one was edited (it renders its own config, so the edit would be silently unused without -c).
SHIPPED = {"nginx.conf": ("fp4",) * 8, "nginx_mixed.conf": ("fp4",) * 4 + ("bf16",) * 4}


def shipped_config(name: str) -> str:
    return render([Worker("127.0.0.1", 8000 + i, p) for i, p in enumerate(SHIPPED[name])], Options())


def public_workers_document(workers: list[Worker]) -> dict:
    """What /dashboard/workers.json tells anyone: ids and precisions, all the dashboard polls by (through
    /workers/<id>/...). Addresses and ports of the workers stay out of it."""
    return {"workers": [{"id": w.id, "precision": w.precision} for w in workers]}


def _write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_outputs(workers: list[Worker], opts: Options, out: Path, workers_json_out: Path | None = None) -> None:
    """Writes the config (0600 when it holds API keys, else 0644) and workers.json (0644) atomically."""
    text = render(workers, opts)
    _write(out, text, 0o600 if opts.api_keys else 0o644)
    if workers_json_out is not None:
        _write(workers_json_out, json.dumps(workers_document(workers, listen_port(opts.listen)), indent=2) + "\n",
               0o644)


def parse_worker(spec: str) -> Worker:
    """port:precision (this host) or host:port:precision[:id]; an IPv6 host in brackets: [fd00::1]:8000:fp4."""
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:([^:]*):([^:]*)(?::([^:]*))?$", spec)
    if m:
        try:
            return Worker(m.group(1), int(m.group(2)), m.group(3), m.group(4) or "")
        except ValueError as exc:
            raise RenderError(f"worker {spec!r}: {exc}") from exc
    parts = spec.split(":")
    try:
        if len(parts) == 2:
            return Worker("127.0.0.1", int(parts[0]), parts[1])
        if len(parts) in (3, 4):
            return Worker(parts[0], int(parts[1]), parts[2], parts[3] if len(parts) == 4 else "")
    except ValueError as exc:
        raise RenderError(f"worker {spec!r}: {exc}") from exc
    raise RenderError(f"worker {spec!r}: use port:precision or host:port:precision[:id]")


def read_workers_file(path: str) -> list[Worker]:
    """Workers from a JSON list of {"host", "port", "precision", "id"} (gateway_workers.py's output)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RenderError(f"workers file {path}: {exc}") from exc
    if not isinstance(doc, list):
        raise RenderError(f"workers file {path}: a JSON list of workers expected")
    workers = []
    for n, entry in enumerate(doc, 1):
        if not isinstance(entry, dict) or not {"host", "port", "precision"} <= entry.keys():
            raise RenderError(f"workers file {path}, entry {n}: needs host, port and precision")
        try:
            workers.append(Worker(str(entry["host"]), int(entry["port"]), str(entry["precision"]),
                                  str(entry.get("id") or "")))
        except (TypeError, ValueError) as exc:
            raise RenderError(f"workers file {path}, entry {n}: {exc}") from exc
    return workers


def _conf_directives(text: str):
    """(name, args) of every directive in an nginx config, at any depth: quotes, escapes and `#` comments are
    read as nginx reads them, so `server { listen 8080; }` on one line and a `listen` word inside a quoted
    string or a comment are told apart."""
    words: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "#":
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif c in ";{}":
            if words:
                yield words[0], words[1:]
            words = []
            i += 1
        elif c.isspace():
            i += 1
        elif c in "\"'":
            j, buf = i + 1, []
            while j < n and text[j] != c:
                if text[j] == "\\" and j + 1 < n:
                    j += 1
                buf.append(text[j])
                j += 1
            words.append("".join(buf))
            i = j + 1
        else:
            m = re.compile(r"[^\s;{}]+").match(text, i)  # a # or quote inside a word is part of it
            words.append(m.group(0))
            i = m.end()


def conf_listen_ports(text: str, conf_dir: Path | None = None, seen: set | None = None) -> list[int]:
    """Ports of the `listen` directives in an nginx config, in order (comments and quoted strings ignored).
    With conf_dir (the folder of the main config, where nginx resolves relative paths), files named by
    `include` are read too, as in Debian's nginx.conf whose servers live in sites-enabled/*; seen: the real
    paths already read (the main file), so a file that includes itself is read once."""
    seen = set() if seen is None else seen
    ports = []
    for name, args in _conf_directives(text):
        if name == "listen" and args:
            value = args[0]
            port = value.rsplit(":", 1)[-1] if not value.startswith("unix:") else ""
            if port.isdigit():
                ports.append(int(port))
            elif re.match(r"^[0-9.]+$|^\[.*\]$|^[A-Za-z][A-Za-z0-9.-]*$", value):
                ports.append(80)  # an address alone listens on 80
        elif name == "include" and args and conf_dir is not None:
            pattern = args[0] if os.path.isabs(args[0]) else str(conf_dir / args[0])
            for path in sorted(glob.glob(pattern)):
                real = os.path.realpath(path)
                if real in seen or not os.path.isfile(real):
                    continue
                seen.add(real)
                try:
                    included = Path(real).read_text(encoding="utf-8", errors="replace")
                except OSError:
                    continue
                ports += conf_listen_ports(included, conf_dir, seen)
    return ports


def _json_get(keys: list[str]) -> int:
    try:
        doc = json.load(sys.stdin)
    except ValueError:
        doc = {}
    for key in keys:
        value = doc
        for part in key.split("."):  # a dotted KEY reads into objects: progress.phase
            value = value.get(part) if isinstance(value, dict) else None
        if value is None or isinstance(value, (dict, list)):
            print("")
        elif isinstance(value, bool):
            print("true" if value else "false")
        else:
            # one line per key, whatever the worker put in it
            print(re.sub(r"[\x00-\x1f\x7f]", " ", str(value)))
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["json-get"]:
        return _json_get(argv[1:])
    if argv[:1] == ["shipped"]:
        # shipped [--write] DIR: print the shipped configs in DIR that are not the renderer's (edited or stale);
        # with --write, render them again instead
        write = argv[1:2] == ["--write"]
        if len(argv) != 2 + write:
            print("usage: render_nginx.py shipped [--write] DIR", file=sys.stderr)
            return 2
        for name in SHIPPED:
            path, text = Path(argv[-1]) / name, shipped_config(name)
            if write:
                path.write_text(text)
            elif not path.is_file() or path.read_text(errors="replace") != text:
                print(name)
        return 0
    if argv[:1] == ["listen-port"]:
        if len(argv) != 2:
            print("usage: render_nginx.py listen-port FILE", file=sys.stderr)
            return 2
        conf = Path(argv[1]).resolve()
        ports = conf_listen_ports(conf.read_text(encoding="utf-8", errors="replace"), conf.parent,
                                  {os.path.realpath(conf)})
        print(" ".join(map(str, ports)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", default="80")
    ap.add_argument("--worker", action="append", default=[], help="port:precision or host:port:precision[:id]")
    ap.add_argument("--images-dir")
    ap.add_argument("--web-dir", default="web")
    ap.add_argument("--rate")
    ap.add_argument("--burst", type=int, default=20)
    ap.add_argument("--max-body", default="1m")
    ap.add_argument("--read-timeout", default="600s")
    ap.add_argument("--user")
    ap.add_argument("--headers-more", default="off", help="auto, off, or the module's path")
    ap.add_argument("--marker", default="flux")
    ap.add_argument("--no-api-keys", action="store_true", help="ignore FLUX_API_KEYS/FLUX_API_KEY_FILE")
    ap.add_argument("--workers-file", help="JSON list of workers (host, port, precision, id)")
    ap.add_argument("--max-fails", type=int, default=3)
    ap.add_argument("--fail-timeout", default="30s")
    ap.add_argument("--resolver", help="DNS resolver for workers named by host name (adds `resolve`)")
    ap.add_argument("--pid")
    ap.add_argument("--temp-dir")
    ap.add_argument("--lora-affinity", choices=("on", "off"), default="on",
                    help="route requests with LoRA adapters by their first adapter's name (default on)")
    ap.add_argument("--out", help="write here (atomically) instead of stdout")
    ap.add_argument("--workers-json-out", help="also write workers.json here")
    args = ap.parse_args(argv)
    try:
        workers = [parse_worker(s) for s in args.worker]
        if args.workers_file:
            workers += read_workers_file(args.workers_file)
        headers_more = {"off": None, "auto": find_headers_more()}.get(args.headers_more, args.headers_more)
        if args.burst < 0:
            raise RenderError("burst must be 0 or more")
        opts = Options(listen=args.listen, images_dir=args.images_dir, web_dir=args.web_dir,
                       rate=args.rate or None, burst=args.burst,
                       max_body=args.max_body, read_timeout=args.read_timeout,
                       api_keys=[] if args.no_api_keys or not args.rate else read_api_keys(),
                       user=args.user, headers_more=headers_more, marker=args.marker, max_fails=args.max_fails,
                       fail_timeout=args.fail_timeout, resolver=args.resolver, pid=args.pid, temp_dir=args.temp_dir,
                       lora_affinity=args.lora_affinity == "on")
        if args.out:
            write_outputs(workers, opts, Path(args.out),
                          Path(args.workers_json_out) if args.workers_json_out else None)
        else:
            sys.stdout.write(render(workers, opts))
    except RenderError as exc:
        print(f"render_nginx: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
