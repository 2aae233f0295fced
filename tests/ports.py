"""Free loopback ports for the tests that start real servers."""
from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(count: int) -> int:
    """First port of `count` consecutive free ports (workers use BASE_PORT..BASE_PORT+count-1)."""
    for _ in range(200):
        base = free_port()
        if base + count < 65535 and all(port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no block of free ports")
