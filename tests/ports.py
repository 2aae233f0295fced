"""Free loopback ports for the tests that start real servers.

Ports come from below the kernel's ephemeral range (net.ipv4.ip_local_port_range): a port picked there with
bind(0) and handed to a worker that binds it seconds later (a model load) can meanwhile become the local end
of one of the test's own outgoing connections, and the worker's bind then fails. Below the range only a
listener takes a port, and the port is checked for one. A port is handed out once per process, so two
servers of one test never get the same number; the start of the search is random, so two test runs on one
machine rarely meet.
"""
from __future__ import annotations

import random
import socket

_given: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


_LOW, _HIGH = 10000, _ephemeral_range()[0] - 1
if _HIGH - _LOW < 2000:  # an unusual range leaves too little below it: fall back to the range above
    _LOW, _HIGH = _ephemeral_range()[1] + 1, 65535
_next = random.randint(_LOW, _HIGH)


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
    global _next
    for _ in range(2000):
        base = _next
        _next = base + count
        if _next > _HIGH:
            _next = _LOW
            continue
        block = range(base, base + count)
        if not _given.intersection(block) and all(port_free(p) for p in block):
            _given.update(block)
            return base
    raise RuntimeError("no block of free ports")


def free_port() -> int:
    return free_port_block(1)
