"""One way to wait for a condition: poll a predicate until it is truthy or a deadline passes.

`wait_until` blocks (tests that talk to real processes); `wait_until_async` awaits (in-process ASGI tests, where
blocking would stall the app under test). Both return the predicate's value and fail naming what never happened.
"""
from __future__ import annotations

import asyncio
import inspect
import time
from typing import Callable


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.05,
               what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


async def wait_until_async(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.01,
                           what: str = "condition"):
    """As wait_until; the predicate may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)
