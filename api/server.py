"""Run one worker under uvicorn with a graceful drain on SIGTERM/SIGINT.

First signal: /health turns 503 "draining" at once and new work is refused with 503 while the port stays
open (so the proxy hears why), accepted requests are answered, and the process exits when the queue is
empty or FLUX_DRAIN_TIMEOUT has passed. A second signal exits at once.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import time

import uvicorn
from pydantic import ValidationError

from api.app import create_app
from api.logs import configure_logging
from api.protocol import guarded_protocol
from api.settings import Precision, Settings, describe_invalid, load_settings

log = logging.getLogger("flux.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime):
        super().__init__(config)
        self.runtime = runtime
        self._drain_task: asyncio.Task | None = None
        self.exit_code = 0

    def handle_exit(self, sig, frame) -> None:
        if self._drain_task is not None or self.runtime.queue is None:
            return super().handle_exit(sig, frame)
        log.info("signal %s: draining (up to %.0f s)", sig, self.runtime.settings.drain_timeout_s)
        self.runtime.set_state("draining")
        self.runtime.queue.begin_drain()
        self._drain_task = asyncio.get_event_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        started = time.monotonic()
        clean = await self.runtime.queue.drain(self.runtime.settings.drain_timeout_s)
        log.info("drained in %.1f s%s", time.monotonic() - started, "" if clean else " (deadline reached)")
        await asyncio.sleep(0.2)  # let the last responses leave
        self.should_exit = True

    async def main_loop(self) -> None:
        # a worker whose GPU context broke exits non-zero, so its supervisor restarts it
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 1) % 864000
            await asyncio.sleep(0.1)
            queue = self.runtime.queue
            if queue is not None and queue.fatal_error and not self.exit_code:
                log.error("fatal GPU error, exiting for a restart: %s", queue.fatal_error)
                self.exit_code = 3
                self.should_exit = True
            should_exit = await self.on_tick(counter)


def uvicorn_config(settings: Settings, app) -> uvicorn.Config:
    """The one uvicorn configuration of a worker (main_*.py and the test launcher alike).

    - http: uvicorn's httptools protocol with header and body bounds (api/protocol.py).
    - proxy_headers off: uvicorn would overwrite the peer address with X-Forwarded-For, and the peer is what
      decides whether X-Forwarded-Host/-Proto are trusted (api/http.py base_url, which validates them too).
    - log_config None: uvicorn's loggers propagate to the root handler of configure_logging, which escapes them.
    """
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                          access_log=False, timeout_keep_alive=settings.keepalive_timeout_s, proxy_headers=False,
                          http=guarded_protocol(settings.header_timeout_s, settings.body_timeout_s), log_config=None)


def run(precision: Precision) -> int:
    try:
        settings = load_settings(precision)
    except ValidationError as exc:  # a bad knob: say which, in words, and exit 2 (no traceback)
        print(describe_invalid(exc, precision), file=sys.stderr, flush=True)
        return 2
    configure_logging(settings.log_level)
    app = create_app(settings)
    server = DrainingServer(uvicorn_config(settings, app), app.state.runtime)
    log.info("worker %s: precision=%s model=%s on %s:%d", settings.job_prefix, precision, settings.model,
             settings.host, settings.port)
    server.run()
    return server.exit_code
