"""A worker with injectable faults, for the production tests: `python -m tests.production.launcher`.

Everything but the failure is real: the same Settings (from the environment, precision bf16), create_app,
DrainingServer and FluxEngine (dummy:tiny on the CPU) as main_bf16.py. A fault is picked per request by a
marker in the prompt, so one process serves good and bad requests side by side. Each is raised from inside
the pipeline's step callback, where a real one would surface, so the engine's own handling runs:

  [oom]         torch.OutOfMemoryError, as CUDA raises it
  [cuda-error]  RuntimeError("CUDA error: an illegal memory access ...") - sticky: the worker must exit 3
  [fail]        RuntimeError whose message names a source file and a path (neither may reach a client)
  [scheduler-crash]  after 5 good steps, an exception that escapes the queue's scheduler task (a bug in the
                scheduler itself): the worker must fail every pending job at once, say "failed" and exit 3

Disk full: while the file $FLUX_TEST_FAULT_DIR/disk_full exists, every image write stops half-way with
ENOSPC, after part of the bytes reached the temp file (what a full disk does), so the store's clean-up is
tested too.
"""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import torch

import api.storage
from api.app import build_engine, create_app
from api.server import DrainingServer, configure_logging, uvicorn_config
from api.settings import load_settings
from models.flux import FluxEngine

FAULTS = {
    "[oom]": lambda: torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.10 GiB"),
    "[cuda-error]": lambda: RuntimeError(
        "CUDA error: an illegal memory access was encountered\n"
        "CUDA kernel errors might be asynchronously reported at some other API call"),
    "[fail]": lambda: RuntimeError(
        'Traceback (most recent call last):\n  File "/opt/flux/secret/models/kernel.py", line 42, in forward\n'
        "ValueError: shape mismatch in /opt/flux/secret/weights.bin"),
}


class SchedulerCrash(BaseException):
    """Not an Exception: nothing on its way up catches it, so it ends the scheduler task."""


def crash_after_steps(steps: int):
    def step(done, total):
        if done >= steps:
            raise SchedulerCrash("planted scheduler failure")
        return False

    return step


class FaultyEngine(FluxEngine):
    """The real engine; a prompt marker makes the first denoising step raise."""

    def generate(self, specs, should_stop=None):
        if any("[scheduler-crash]" in s.prompt for s in specs):
            return super().generate(specs, crash_after_steps(5))
        fault = next((make for marker, make in FAULTS.items() if any(marker in s.prompt for s in specs)), None)
        if fault is None:
            return super().generate(specs, should_stop)

        def failing_step(step, total):
            raise fault()

        return super().generate(specs, failing_step)


class _HalfWriter:
    """A file whose write puts half the bytes on disk, then fails like a full disk."""

    def __init__(self, fh):
        self._fh = fh

    def write(self, data):
        self._fh.write(data[: len(data) // 2])
        self._fh.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()
        return False


def install_disk_full_switch(fault_dir: Path) -> None:
    real_open = open

    def open_for_store(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        if "w" in mode and (fault_dir / "disk_full").exists():
            return _HalfWriter(fh)
        return fh

    api.storage.open = open_for_store  # the module's name lookup finds this before the builtin


def main() -> int:
    settings = load_settings("bf16")
    configure_logging(settings.log_level)
    fault_dir = os.environ.get("FLUX_TEST_FAULT_DIR")
    if fault_dir:
        install_disk_full_switch(Path(fault_dir))
    app = create_app(settings, engine=FaultyEngine(build_engine(settings).config))
    server = DrainingServer(uvicorn_config(settings, app), app.state.runtime)
    server.run()
    return server.exit_code


if __name__ == "__main__":
    sys.exit(main())
