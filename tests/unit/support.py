"""Helpers for the in-process tests: engines over the shared pipelines, fault injection, app harnesses.

The engines here are the real FluxEngine over the real dummy:tiny FluxPipeline. The only departures are
the ones a failure needs: a gate that holds a generation (to fill the queue or keep a request in flight),
a load that blocks or fails, and a pipeline that runs out of memory.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

from api.settings import Settings
from models.flux import FluxEngine
from tests.harness.asserts import PNG_MAGIC, assert_error, assert_png  # noqa: F401 (re-exported)
from tests.harness.waiting import wait_until_async as wait_until

ROOT = Path(__file__).resolve().parents[2]

# The smallest request the API accepts, rendered in a few hundredths of a second by dummy:tiny.
SMALL = {"prompt": "a red fox in fresh snow", "width": 256, "height": 256, "num_inference_steps": 2, "seed": 7}


def make_settings(tmp_path: Path, precision: str = "bf16", **overrides) -> Settings:
    values = dict(model="dummy:tiny", precision=precision, device="cpu", output_dir=str(tmp_path / "images"),
                  warmup_sizes="256x256", warmup_steps=1, drain_timeout_s=10.0, port=8000)
    values.update(overrides)
    return Settings(**values)


class PreloadedEngine(FluxEngine):
    """A FluxEngine sharing an already loaded pipeline: load() and warmup() cost nothing, generate() is real.

    Each instance keeps its own prompt cache, so tests do not see each other's cache hits.
    """

    def __init__(self, loaded: FluxEngine):
        super().__init__(loaded.config)
        self.pipe, self.device, self.info = loaded.pipe, loaded.device, loaded.info
        self.batches: list[list] = []  # the specs of every generate call, in order

    def load(self):
        return self.info

    def warmup(self) -> float:
        return 0.0

    def generate(self, specs, should_stop=None):
        self.batches.append(list(specs))
        return super().generate(specs, should_stop)


class GatedEngine(PreloadedEngine):
    """Generation waits for `gate` (open by default): a closed gate keeps a batch on the GPU thread."""

    def __init__(self, loaded: FluxEngine, *, closed: bool = False):
        super().__init__(loaded)
        self.gate = threading.Event()
        if not closed:
            self.gate.set()
        self.entered = threading.Event()  # set when a batch reaches the engine

    def generate(self, specs, should_stop=None):
        self.entered.set()
        if not self.gate.wait(timeout=30):
            raise RuntimeError("test gate was never opened")
        return super().generate(specs, should_stop)


class BlockingLoadEngine(PreloadedEngine):
    """load() blocks until `release` is set, like a large model still coming off the disk."""

    def __init__(self, loaded: FluxEngine):
        super().__init__(loaded)
        self.release = threading.Event()
        self.loading = threading.Event()

    def load(self):
        self.loading.set()
        if not self.release.wait(timeout=30):
            raise RuntimeError("test load was never released")
        return self.info


class FailingPipe:
    """Wraps a pipeline: the next `times` calls raise `make_error()`, later calls render normally."""

    def __init__(self, pipe, make_error, times: int = 1):
        self._pipe = pipe
        self._make_error = make_error
        self.remaining = times

    def __call__(self, *args, **kwargs):
        if self.remaining > 0:
            self.remaining -= 1
            raise self._make_error()
        return self._pipe(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._pipe, name)


def cuda_out_of_memory() -> Exception:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.10 GiB total "
                                  "capacity; 70.02 GiB already allocated)")


class OutOfMemoryPipe(FailingPipe):
    """The next `times` calls raise torch.OutOfMemoryError as CUDA would, then the pipeline works again."""

    def __init__(self, pipe, times: int = 1):
        super().__init__(pipe, cuda_out_of_memory, times)


# ---- in-process app (ASGI) ------------------------------------------------------------------------
async def wait_for_state(http: httpx.AsyncClient, state: str, timeout: float = 20.0) -> dict:
    async def reached():
        body = (await http.get("/health")).json()
        return body if body["status"] == state else None

    return await wait_until(reached, timeout)


@contextlib.asynccontextmanager
async def serve(app, *, peer: tuple[str, int] = ("127.0.0.1", 40123), ready: bool = True):
    """Run the app's lifespan (model load, queue) and yield a client talking to it in process."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=peer, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30) as http:
            if ready:
                await wait_for_state(http, "ready")
            yield http


async def queue_stats(http: httpx.AsyncClient) -> dict:
    return (await http.get("/queue-stats")).json()


# ---- a real uvicorn server in a thread --------------------------------------------------------------
class ThreadedServer:
    """uvicorn on a free 127.0.0.1 port in a background thread (its own event loop): real sockets, so
    client disconnects and raw request paths behave as they do in production."""

    def __init__(self, app, server_cls=uvicorn.Server, **server_args):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False, log_config=None)
        self.server = server_cls(config, **server_args)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="uvicorn-test", daemon=True)

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self.server.serve(sockets=[self.sock]))
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
        finally:
            self.loop.close()

    def start(self, timeout: float = 20.0) -> "ThreadedServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start: {self.error!r}")
            time.sleep(0.01)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while httpx.get(f"{self.base_url}/health").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the worker never became ready")
            time.sleep(0.02)

    def call_in_loop(self, fn, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self, timeout: float = 30.0) -> None:
        if self.thread.is_alive():
            self.server.should_exit = True
            self.thread.join(timeout)
        assert not self.thread.is_alive(), "uvicorn thread did not stop"
        if self.error is not None:
            raise self.error


# ---- assertions (tests/harness/asserts.py, under the names the in-process tests use) -------------------
def assert_json_error(response: httpx.Response, status: int, code: str, field: str | None = None) -> dict:
    return assert_error(response, status, code, field)


def png_image(data: bytes):
    return assert_png(data)
