"""Fixtures of the production tests: real worker processes (tests/harness/process.py), shared per session.

Every worker here is a real `main_bf16.py` (or the fault-injecting launcher next to this file) serving the
real FluxPipeline with `dummy:tiny` weights on the CPU, on a free port, talked to over HTTP. Workers are
started once per session or module and shared; tests that consume a worker (SIGTERM, fatal errors) start
their own. The helpers live in tests/harness/; the names below are re-exported for the test modules.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.asserts import LEAK_RE, assert_error, assert_no_leak, assert_png  # noqa: F401
from tests.harness.jobs import (LONG_JOB, QUICK_JOB, image_files, job_state, sse_events, submit_job,  # noqa: F401
                                wait_job)
from tests.harness.process import BASE_ENV, PYTHON, ROOT, Worker, start_all  # noqa: F401
from tests.harness.waiting import wait_until  # noqa: F401
from tests.ports import free_port  # noqa: F401


def pytest_collection_modifyitems(config, items):
    # no test may hang the suite: a default per-test limit unless the test sets its own
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(180))


# ---- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("production")


@pytest.fixture(scope="session")
def worker(workdir):
    """The shared, well-behaved worker: default queue, GPU index 1 in its labels."""
    w = Worker("main", workdir, {"FLUX_GPU_INDEX": "1"})
    start_all(w)
    yield w
    w.stop()


@pytest.fixture
def idle_worker(worker):
    """The shared worker, with nothing queued or running before and after the test."""
    def quiet():
        s = worker.stats()
        return s["queued"] == 0 and s["running"] == 0

    wait_until(quiet, 60, 0.1, "the shared worker to be idle")
    yield worker
    # cancel whatever a failed test left behind, so the next test starts clean
    while worker.open_jobs:
        worker.client.delete(f"/jobs/{worker.open_jobs.pop()}")
    wait_until(quiet, 60, 0.1, "the shared worker to be idle after the test")
