"""Small client-side helpers shared by the tests that talk to a running worker."""
from __future__ import annotations

import threading

import httpx

from tests.harness.waiting import wait_until


def wait_for(predicate, timeout: float = 10.0):
    """Poll until predicate() is truthy and return its value (tests/harness/waiting.py)."""
    return wait_until(predicate, timeout, 0.02)


class Background:
    """One blocking POST /generate on its own thread."""

    def __init__(self, base_url: str, body: dict, timeout: float = 60.0):
        self.timeout = timeout
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(base_url, body), daemon=True)
        self.thread.start()

    def _run(self, base_url, body):
        try:
            self.response = httpx.post(f"{base_url}/generate", json=body, timeout=self.timeout)
        except BaseException as exc:
            self.error = exc

    def result(self, timeout: float | None = None) -> httpx.Response:
        self.thread.join(self.timeout if timeout is None else timeout)
        assert not self.thread.is_alive(), "the request never finished"
        if self.error is not None:
            raise self.error
        return self.response
