"""uvicorn's HTTP/1.1 protocol with the bounds it lacks: on the request header (time and size) and on the body.

uvicorn (0.54) times only idle keep-alive connections. A client that opens a connection and sends nothing, or one
header byte a minute, or declares a body and then stalls, holds a socket and a file descriptor for ever; a few
thousand such clients exhaust a worker reached directly, whatever nginx does in front of the others. So, per
connection:

- header: armed when the connection opens and when a new request begins, cancelled once the request's headers
  are complete; on expiry the connection is closed (nothing useful can be said to a client mid-header, and nginx's
  client_header_timeout does the same).
- header size: httptools buffers a request line and header of any length (a 200 MB header grew a worker by
  180 MB); past MAX_HEADER_BYTES before the header is complete the request is answered 431 (JSON) and the
  connection closed. nginx in front allows 4 x 8 KiB; the bound only stops a client that reaches a worker directly.
- body: armed when the headers are complete and again on every piece of the body, cancelled when the body is
  complete. While the app is still working on the request, the app's own per-receive bound (api/middleware.py)
  answers 408; once the response has gone, a body still trickling in is no longer anyone's and the connection
  is closed.

Built on uvicorn's httptools protocol (uvicorn[standard] installs httptools; it is uvicorn's default "auto" choice
too) and selected in api/server.py uvicorn_config, the one place a worker's uvicorn is configured.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.errors import ApiError, BadRequest, HeaderTooLarge
from api.middleware import REQUEST_ID_RE


log = logging.getLogger("flux.connection")
# X-Request-ID as a header line in raw bytes (nginx sends its id in the header block whatever the request line holds)
_RAW_REQUEST_ID = re.compile(rb"\r\nx-request-id:[ \t]*([A-Za-z0-9._-]{1,64})[ \t]*\r\n", re.IGNORECASE)
MAX_HEADER_BYTES = 64 * 1024  # request line and header fields; counted per read, so exact to one read (<= 256 KiB)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._guard: asyncio.TimerHandle | None = None
        self._guard_kind = ""
        self._in_header = True  # between requests, or inside a request line or header
        self._last_read = b""  # the latest bytes read, for a request id the parser never reached
        self._header_bytes = 0

    def _arm(self, kind: str, delay: float) -> None:
        self._disarm()
        self._guard_kind = kind
        self._guard = self.loop.call_later(delay, self._expired, kind)

    def _disarm(self) -> None:
        if self._guard is not None:
            self._guard.cancel()
        self._guard, self._guard_kind = None, ""

    def _expired(self, kind: str) -> None:
        self._guard, self._guard_kind = None, ""
        if self.transport is None or self.transport.is_closing():
            return
        if kind == "body" and self.cycle is not None and not self.cycle.response_complete:
            # the app holds the request: its per-receive bound answers 408 (with the request id); keep watching
            self._arm("body", self.body_timeout_s)
            return
        peer = "%s:%s" % self.client if self.client else "?"
        if kind == "header":
            log.info("closing connection from %s: no complete request header within %.0f s", peer,
                     self.header_timeout_s)
        else:
            log.info("closing connection from %s: request body stalled for %.0f s after the response", peer,
                     self.body_timeout_s)
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers a request its parser refuses in plain text; nginx passes that answer on (it accepts bytes
        # httptools does not), so it is the API's JSON error here, with a request id like every other answer.
        self._refuse(BadRequest("the request could not be parsed (malformed request line, header or body "
                                "framing)"), b"400 Bad Request", f"refused by the HTTP parser: {msg}")

    def _refuse(self, error: ApiError, status_line: bytes, why: str) -> None:
        """Answer `error` as JSON and close: the request cannot be read on. The request id is one the parser read
        before the problem (nginx sends its X-Request-ID first), so nginx's log, its answer's header and this body
        agree; else a new one."""
        sent = [value.decode("latin-1") for name, value in (self.headers or ()) if name == b"x-request-id"]
        if not sent:  # refused before the parser reached the headers (a bad byte in the request line)
            sent = [m.group(1).decode() for m in _RAW_REQUEST_ID.finditer(self._last_read)][:1]
        request_id = sent[0] if sent and REQUEST_ID_RE.match(sent[0]) else uuid.uuid4().hex
        body = json.dumps(error.body(request_id)).encode()
        log.info("request_id=%s from %s %s", request_id, "%s:%s" % self.client if self.client else "?", why)
        head = [b"HTTP/1.1 " + status_line + b"\r\n"]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body),
                 b"x-request-id: " + request_id.encode() + b"\r\n", b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        self._last_read = data
        if self._in_header:
            self._header_bytes += len(data)
        super().data_received(data)
        if self._in_header and self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
            self._disarm()
            self._refuse(HeaderTooLarge(f"the request line and header must be at most {MAX_HEADER_BYTES} bytes"),
                         b"431 Request Header Fields Too Large", f"refused: header over {MAX_HEADER_BYTES} bytes")

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm("header", self.header_timeout_s)

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    # httptools parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._guard_kind != "header":  # a connection's first request already runs on the connect-time bound
            self._arm("header", self.header_timeout_s)

    def on_headers_complete(self) -> None:
        self._in_header, self._header_bytes = False, 0
        self._arm("body", self.body_timeout_s)  # on_message_complete disarms it at once when there is no body
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._arm("body", self.body_timeout_s)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_header = True  # what comes next on this connection is the next request's header
        super().on_message_complete()


def guarded_protocol(header_timeout_s: float, body_timeout_s: float) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for uvicorn.Config(http=...), with this worker's bounds."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,),
                {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s})
