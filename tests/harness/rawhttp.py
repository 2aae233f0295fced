"""Raw HTTP/1.x over a socket, for requests no HTTP client library would send (no Host, bad bytes, stalls)."""
from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-cased names; the last value wins
    body: bytes
    header_lines: list[tuple[str, str]] = field(default_factory=list)  # every header as sent, in order

    def all(self, name: str) -> list[str]:
        """Every value sent under `name` (lower-case), repeats included."""
        return [v for n, v in self.header_lines if n == name]

    def json(self):
        return json.loads(self.body)


def read_response(sock: socket.socket) -> RawResponse | None:
    """One response (Content-Length or chunked body); None if the peer closed before sending any byte."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            if not buf:
                return None
            raise AssertionError(f"connection closed mid-response: {buf[:200]!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    header_lines = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        header_lines.append((name.strip().lower(), value.strip()))
    headers = dict(header_lines)

    def more() -> bytes:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("connection closed mid-body")
        return chunk

    if "content-length" in headers:
        size = int(headers["content-length"])
        while len(rest) < size:
            rest += more()
        return RawResponse(status, headers, rest[:size], header_lines)
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            while b"\r\n" not in rest:
                rest += more()
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                rest += more()
            body, rest = body + rest[:size], rest[size + 2:]
            if size == 0:
                return RawResponse(status, headers, body, header_lines)
    body = rest
    while chunk := sock.recv(65536):  # delimited by the close
        body += chunk
    return RawResponse(status, headers, body, header_lines)


def exchange(port: int, data: bytes, timeout: float = 60.0) -> RawResponse | None:
    """Send `data` on a new connection and read one response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_response(sock)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if the peer closes (EOF or reset) within `seconds`, whatever it sends before that."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except (socket.timeout, TimeoutError):
        return False


def post_json_request(path: str, body: bytes, headers: dict[str, str] | None = None,
                      version: str = "HTTP/1.1") -> bytes:
    lines = [f"POST {path} {version}", "Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
