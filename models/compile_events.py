"""A count of torch.compile (dynamo) compilations in this process, for /metrics and the no-recompile tests.

Every dynamo compilation (a first compile or a recompile after a failed guard) starts with the compile-start
callback, so after warm-up any increase means a request paid for a compile.
"""
from __future__ import annotations

import threading

_lock = threading.Lock()
_count = 0
_installed = False


def _on_start(args) -> None:
    global _count
    with _lock:
        _count += 1


def install() -> None:
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    from torch._dynamo.callback import callback_handler

    callback_handler.register_start_callback(_on_start)


def count() -> int:
    return _count
