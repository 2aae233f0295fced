"""Pure ASGI middleware (no BaseHTTPMiddleware: it would hide client disconnects from the handlers).

RequestContext: request id (X-Request-ID from the proxy, or a new one), the API-key check, the request body's
bounds (a stalled body is answered 408, a client hanging up mid-body is a 499, never a 500), one access-log
line per request (id, status, queue ms, generate ms) and the request counter. Client strings reach the log
as they are: the log formatter (api/logs.py) escapes every record.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
import uuid

from api.errors import ApiError, ClientClosedRequest, RequestTimeout, Unauthorized

access_log = logging.getLogger("flux.access")
log = logging.getLogger("api.app")
# The one rule for a request id a client or proxy may choose; anything else is replaced by a new one. The nginx
# config renderer applies the same pattern (PCRE reads it alike), so an id is kept or replaced the same way
# at both layers.
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
REQUEST_ID_RE = re.compile(REQUEST_ID_PATTERN)
OPEN_PATHS = ("/health", "/live", "/metrics", "/images/", "/queue-stats")


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _route_label(path: str) -> str:
    """A bounded label for metrics: ids and names are folded."""
    if path.startswith("/images/"):
        return "/images"
    if path.startswith("/jobs/"):
        return "/jobs/{id}/events" if path.endswith("/events") else "/jobs/{id}"
    known = ("/", "/generate", "/jobs", "/health", "/live", "/queue-stats", "/metrics", "/v1/images/generations",
             "/generate/fast", "/generate/quality")
    return path if path in known else "other"


def _expects_body(scope) -> bool:
    length = _header(scope, b"content-length")
    if length is not None:
        return length.strip() not in ("", "0")
    return _header(scope, b"transfer-encoding") is not None


def bounded_receive(scope, receive, timeout_s: float):
    """`receive` with the body's bounds: each piece of a declared body must come within timeout_s (else
    RequestTimeout, 408), and a disconnect before the body is complete is ClientClosedRequest (499). Once the
    body is complete (or when there is none) messages pass through untouched, so disconnect polling during a
    long generation or an event stream works as before."""
    pending = _expects_body(scope)

    async def receive_body():
        nonlocal pending
        if not pending:
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), timeout_s)
        except asyncio.TimeoutError:
            pending = False
            raise RequestTimeout(f"the request body did not arrive within {timeout_s:g} s", field="body") from None
        if message["type"] == "http.disconnect":
            pending = False
            raise ClientClosedRequest("the client closed the connection before sending the whole body",
                                      field="body")
        if not message.get("more_body", False):
            pending = False
        return message

    return receive_body


class RequestContext:
    def __init__(self, app, runtime_getter):
        self.app = app
        self.runtime_getter = runtime_getter

    def _authorized(self, scope, keys: frozenset[str]) -> tuple[bool, str]:
        # The key is read exactly as nginx's rate-limit map reads it (one header of each name, blanks = spaces
        # and tabs): a credential read another way here would be served while nginx counted it against the
        # client address, a second budget for one tenant. Two headers of a name are refused, never picked from.
        found = {name: [v.decode("latin-1") for k, v in scope.get("headers", ()) if k == name]
                 for name in (b"authorization", b"x-api-key")}
        if any(len(values) > 1 for values in found.values()):
            return False, ""
        token = None
        auth = found[b"authorization"][0] if found[b"authorization"] else None
        if auth and auth[:7].lower() == "bearer ":
            token = auth[7:].strip(" \t")
        token = token or (found[b"x-api-key"][0].strip(" \t") if found[b"x-api-key"] else None)
        if not token:
            return False, ""
        # compare against every key in constant time, without stopping at the first match
        matched = ""
        for key in keys:
            if hmac.compare_digest(token.encode(), key.encode()):
                matched = key
        return bool(matched), (hashlib.sha256(matched.encode()).hexdigest()[:12] if matched else "")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rt = self.runtime_getter()
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status_holder = {"status": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = dict(message, headers=headers)
            await send(message)

        path = scope.get("path", "")
        keys = rt.api_keys if rt is not None else frozenset()
        if keys and not path.startswith(OPEN_PATHS) and path != "/":
            ok, principal = self._authorized(scope, keys)
            if not ok:
                err = Unauthorized("a valid API key is required (Authorization: Bearer <key> or X-API-Key)")
                body = json.dumps(err.body(request_id)).encode()
                await send_wrapper({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
                await send_wrapper({"type": "http.response.body", "body": body})
                self._log(scope, request_id, 401, started, state, rt)
                return
            state["api_key_id"] = principal
        if rt is not None:
            receive = bounded_receive(scope, receive, rt.settings.body_timeout_s)
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            # A bug's exception answered here, not re-raised: Starlette's outer handler would answer the same 500
            # and then re-raise, and uvicorn resets a kept-alive connection on any exception that reaches it, so
            # nginx's next request on it (another client's) would fail with a 502.
            if status_holder.get("started"):
                raise  # the response already started: only closing the connection can end it
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            body = json.dumps(ApiError("internal error; see the worker log for this request id").body(
                request_id)).encode()
            await send_wrapper({"type": "http.response.start", "status": 500,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode())]})
            await send_wrapper({"type": "http.response.body", "body": body})
        finally:
            self._log(scope, request_id, status_holder["status"], started, state, rt)

    @staticmethod
    def _log(scope, request_id, status, started, state, rt) -> None:
        path = scope.get("path", "")
        if rt is not None:
            rt.metrics.request(_route_label(path), status)
        if path in ("/health", "/live", "/metrics", "/queue-stats"):
            return  # probes every few seconds would drown the log
        queue_ms, generate_ms = state.get("timing", (None, None))
        access_log.info("request_id=%s method=%s path=%s status=%d total_ms=%.1f queue_ms=%s generate_ms=%s",
                        request_id, scope.get("method"), path, status, (time.perf_counter() - started) * 1000,
                        queue_ms, generate_ms)
