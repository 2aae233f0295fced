"""Request plumbing shared by the routers: body parsing, validation errors, URLs, Idempotency-Keys.

Waiting on a job, admission and ownership live in api/service.py."""
from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import re
import secrets
import time

from fastapi import Request
from pydantic import BaseModel, ValidationError

from api.errors import (ApiError, Conflict, Draining, InvalidJson, InvalidRequest, NotReady, PayloadTooLarge,
                        Timeout, UnsupportedMediaType)
from api.queue import Job
from api.schemas import MAX_PIXELS, MAX_SEED, GenerateRequest
from models.flux import ImageSpec

JSON_TYPES = ("application/json",)
LARGE_BODY = 1 << 20


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


class _Duplicated(dict):
    key = ""


def _object_without_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are all different: with a key twice, the last would silently win, and which one a
    client meant (or another parser would take) is anybody's guess. An object with a key twice is marked (the
    parser builds inner objects first, so only the finished document tells where it sits)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        obj = _Duplicated(obj)
        obj.key = next(k for k, _ in pairs if k in seen or seen.add(k))
    return obj


def _duplicate_path(data) -> str | None:
    """The field path ("loras.0.name") of the first key given twice, or None. Iterative: nesting may be deep."""
    stack = [(data, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, _Duplicated):
            return f"{path}.{node.key}" if path else node.key
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        stack.extend(reversed([(v, f"{path}.{k}" if path else str(k)) for k, v in children
                               if isinstance(v, (dict, list))]))
    return None


def _loads(raw: bytes):
    marked: list[dict] = []

    def hook(pairs):
        obj = _object_without_duplicates(pairs)
        if isinstance(obj, _Duplicated):
            marked.append(obj)
        return obj

    data = json.loads(raw, object_pairs_hook=hook)
    if marked:  # the walk only for a body that has a key twice
        raise _DuplicateKey(_duplicate_path(data) or marked[0].key)
    return data


async def read_json_object(request: Request, max_bytes: int, image_bytes: int = 0) -> dict:
    """The body as a JSON object, or a named 4xx: wrong content type, too large, not JSON, not an object.

    With image_bytes, a body may be larger by two base64 files of that size (an image and a mask), but only if it
    carries an `image` or `mask`: every other body keeps max_bytes."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in JSON_TYPES and not ctype.endswith("+json"):
        raise UnsupportedMediaType("send the body as JSON with Content-Type: application/json",
                                   field="content-type")
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):  # the bytes would be read as JSON and fail with a decoder's message
        raise UnsupportedMediaType("Content-Encoding is not supported: send the JSON body uncompressed",
                                   field="content-encoding")
    limit = max_bytes + image_body_allowance(image_bytes)
    too_large = PayloadTooLarge(f"the body must be at most {max_bytes} bytes" + (
        f" ({limit} with an image)" if image_bytes else ""), field="body")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        # a body with images can be megabytes: parse those off the event loop, so other requests keep moving
        data = _loads(raw) if size < LARGE_BODY else await asyncio.to_thread(_loads, raw)
    except _DuplicateKey as exc:
        raise InvalidRequest(f"{exc.key}: given more than once", field=exc.key) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidJson(f"the body is not valid JSON: {exc}", field="body") from None
    except (ValueError, RecursionError):  # a number over 4300 digits, or nesting deeper than the parser goes
        raise InvalidJson("the body is not usable JSON: a number is too long or the nesting too deep",
                          field="body") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object", field="body")
    if size > max_bytes and data.get("image") is None and data.get("mask") is None:
        raise too_large
    return data


def image_body_allowance(image_bytes: int) -> int:
    """Room for an image and a mask in base64 (4 characters per 3 bytes) with their data-URL prefixes."""
    return 2 * (4 * -(-image_bytes // 3) + 128) if image_bytes else 0


def validation_error(exc: ValidationError) -> InvalidRequest:
    first = exc.errors(include_url=False)[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or None
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    elif first.get("type") == "missing":
        msg = "field required"
    return InvalidRequest(f"{field}: {msg}" if field else msg, field=field)


def parse_model(model: type[BaseModel], data: dict) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def parse_generate(data: dict, max_prompt_chars: int) -> GenerateRequest:
    req = parse_model(GenerateRequest, data)
    if req.width * req.height > MAX_PIXELS:
        raise InvalidRequest(f"width: width x height must be at most {MAX_PIXELS:,} pixels (4 megapixels)",
                             field="width")
    if len(req.prompt) > max_prompt_chars:
        raise InvalidRequest(f"prompt: at most {max_prompt_chars} characters", field="prompt")
    return req


def make_spec(req: GenerateRequest, info, inputs: dict | None = None) -> ImageSpec:
    """`inputs` is what api.inputs.prepare_inputs made of the request: checked adapters, decoded images."""
    seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED + 1)
    extra = dict(inputs or {})
    return ImageSpec(
        prompt=req.prompt, seed=seed, width=extra.pop("width", req.width), height=extra.pop("height", req.height),
        steps=req.num_inference_steps or info.default_steps,
        guidance=req.guidance_scale if req.guidance_scale is not None else info.default_guidance, **extra,
    )


def output_options(req: GenerateRequest, settings) -> dict:
    """The encoding of a request's image: its own output_format/output_quality, else the worker's defaults."""
    fmt = req.output_format or settings.output_format
    if fmt == "png":
        if req.output_quality is not None:  # png asked for, or the worker's default
            raise InvalidRequest("output_quality: applies to jpeg and webp only; png is lossless",
                                 field="output_quality")
        return {"output_format": fmt, "output_quality": None}
    return {"output_format": fmt, "output_quality": req.output_quality or settings.output_quality}


# host[:port] as a URL may carry it: a DNS name or IPv4 address (labels of letters, digits, "-", "_"), or an IPv6
# address in brackets; an optional port. Anything else (spaces, "@", "/", quotes, controls) is not a host.
_HOST_RE = re.compile(r"(?:(?P<name>[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                      r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?)"
                      r"|\[(?P<ip6>[0-9A-Fa-f:.]{2,45})\])(?::(?P<port>[0-9]{1,5}))?")


def valid_host(value: str | None) -> str | None:
    """`value` if it is a usable host[:port] for a URL, else None."""
    if not value or len(value) > 260:
        return None
    match = _HOST_RE.fullmatch(value)
    if match is None:
        return None
    if match["port"] is not None and not 0 < int(match["port"]) < 65536:
        return None
    if match["ip6"] is not None:
        try:
            ipaddress.IPv6Address(match["ip6"])
        except ValueError:
            return None
    return value


def _peer_trusted(peer: str, trusted: frozenset[str]) -> bool:
    """Is the connection's peer one of FLUX_TRUSTED_PROXIES (addresses or networks; "*" for any)?"""
    if not peer:
        return False
    if "*" in trusted or peer in trusted:
        return True
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    for entry in trusted:
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def client_address(request: Request, trusted: frozenset[str]) -> str:
    """The client a per-address limit counts. From a trusted proxy, the X-Real-IP it sets (our nginx replaces any
    the client sent with the address it saw) when that is an IP address; else the TCP peer. Behind nginx the peer
    is nginx for every client: counting it would make one client's limit everyone's."""
    peer = request.client.host if request.client else ""
    if _peer_trusted(peer, trusted):
        try:
            return str(ipaddress.ip_address(request.headers.get("x-real-ip", "").strip()))
        except ValueError:
            pass
    return peer


def base_url(request: Request, trusted: frozenset[str], public_url: str | None) -> str:
    """Where clients reach us, to prefix /images/<name> with.

    FLUX_PUBLIC_URL when set. Else scheme://host where, from a peer in FLUX_TRUSTED_PROXIES, X-Forwarded-Proto
    (http or https) gives the scheme and X-Forwarded-Host (a valid host[:port]) the host; the connection's own
    scheme and the Host header (a valid host[:port]) stand in for whichever is missing, invalid or untrusted.
    With no valid host at all, "" (a relative URL): never the worker's own listening address, which a client
    behind a proxy cannot reach, and never a client string that is not a host. The peer is the TCP peer
    (uvicorn's proxy_headers is off, see api/server.py), not X-Forwarded-For.
    """
    if public_url:
        return public_url.rstrip("/")
    scheme = request.scope.get("scheme", "http")
    scheme = scheme if scheme in ("http", "https") else "http"
    host = None
    peer = request.client.host if request.client else ""
    if _peer_trusted(peer, trusted):
        proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
        if proto in ("http", "https"):
            scheme = proto
        host = valid_host(request.headers.get("x-forwarded-host", "").split(",")[0].strip())
    host = host or valid_host(request.headers.get("host", "").strip())
    return f"{scheme}://{host}" if host else ""


def ensure_accepting(state: str) -> None:
    if state == "draining":
        raise Draining("the server is shutting down; retry on another worker", retry_after=1)
    if state != "ready" and state != "degraded":
        raise NotReady(f"the model is not ready ({state})", retry_after=5)


class IdempotencyStore:
    """Idempotency-Key → job ids, so a retried POST returns the first attempt's job(s) instead of new images.

    Keys are already scoped to their principal (see idempotency_key). With a JobStore attached, every key is
    written through to it and read back at start-up, so a key outlives a graceful restart of the worker.
    """

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self.journal = None
        self._entries: dict[str, tuple[str, list[str], float]] = {}  # key -> (fingerprint, job ids, expiry)

    def attach(self, journal) -> None:
        self.journal = journal
        self._entries.update(journal.load_keys())

    @staticmethod
    def fingerprint(route: str, data: dict) -> str:
        # a digest: a body can carry megabytes of image, which must not be kept once per key
        return hashlib.sha256((route + json.dumps(data, sort_keys=True, separators=(",", ":"))).encode()).hexdigest()

    def lookup(self, key: str, fingerprint: str) -> list[str] | None:
        entry = self._entries.get(key)
        if entry is None or entry[2] < time.time():
            return None
        if entry[0] != fingerprint:
            raise Conflict("this Idempotency-Key was used with a different request", field="Idempotency-Key")
        return entry[1]

    def remember(self, key: str, fingerprint: str, job_ids: list[str]) -> None:
        expires = time.time() + self.ttl_s
        self._entries[key] = (fingerprint, list(job_ids), expires)
        if self.journal is not None:
            self.journal.remember_key(key, fingerprint, list(job_ids), expires)

    def sweep(self) -> None:
        now = time.time()
        gone = [k for k, v in self._entries.items() if v[2] < now]
        for key in gone:
            del self._entries[key]
        if self.journal is not None:
            self.journal.forget_keys(gone)


def idempotency_key(request: Request) -> str | None:
    # read as nginx hashes it to pick the worker: one header (a newer nginx joins two into one value, so a retry
    # sending one of them could reach another worker and render again), blanks = spaces and tabs
    keys = request.headers.getlist("idempotency-key")
    if not keys:
        return None
    if len(keys) > 1:
        raise InvalidRequest("Idempotency-Key: send one", field="Idempotency-Key")
    key = keys[0].strip(" \t")
    if not key or len(key) > 200:
        raise InvalidRequest("Idempotency-Key must be 1 to 200 characters", field="Idempotency-Key")
    principal = getattr(request.state, "api_key_id", "")
    return f"{principal}:{key}"


def job_error(job: Job) -> ApiError:
    if job.error is not None:
        return job.error
    return Timeout("the request did not finish")
