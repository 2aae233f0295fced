"""start_multi_gpu.sh -g: GPUs per worker. What each worker is given (its GPUs, group size, parallel mode, port)
is read from the worker's own environment: FLUX_PYTHON points at a probe that prints it instead of serving."""
from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
START = ROOT / "start_multi_gpu.sh"

pytestmark = pytest.mark.integration


def script(tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FLUX_", "NUM_GPUS", "BASE_PORT", "NGINX_"))}
    base.update({"FLUX_RUN_DIR": str(tmp / "run"), "FLUX_LOG_DIR": str(tmp / "logs"),
                 "FLUX_OUTPUT_DIR": str(tmp / "out"), "BASE_PORT": "19000", "NO_COLOR": "1", **env})
    return subprocess.run([str(START), *args], cwd=ROOT, env=base, capture_output=True, text=True, timeout=60)


def worker_env(tmp: Path, index: int, *args: str, **env: str) -> dict[str, str]:
    probe = tmp / "probe"
    probe.write_text("#!/bin/sh\nenv\n")
    probe.chmod(probe.stat().st_mode | stat.S_IEXEC)
    result = script(tmp, "worker", str(index), *args, FLUX_PYTHON=str(probe), FLUX_DEVICE="cuda", **env)
    assert result.returncode == 0, result.stderr
    log = next((tmp / "logs").glob(f"flux_gpu{index}_port*.log")).read_text()
    return dict(line.split("=", 1) for line in log.splitlines() if "=" in line)


def test_each_worker_gets_its_group_of_gpus_its_mode_and_one_port(tmp_path):
    first = worker_env(tmp_path, 0, "-g", "2,1,1", NUM_GPUS="4")
    assert (first["CUDA_VISIBLE_DEVICES"], first["FLUX_GPUS_PER_WORKER"], first["FLUX_PARALLEL"]) == \
        ("0,1", "2", "ulysses")
    assert (first["FLUX_GPU_INDEX"], first["FLUX_PORT"]) == ("0", "19000")
    third = worker_env(tmp_path, 2, "-g", "2,1,1", NUM_GPUS="4", FLUX_PARALLEL="ring")
    # a worker of one GPU never joins a group, also when FLUX_PARALLEL is set for the others
    assert (third["CUDA_VISIBLE_DEVICES"], third["FLUX_GPUS_PER_WORKER"], third["FLUX_PARALLEL"]) == ("3", "1", "off")
    assert (third["FLUX_GPU_INDEX"], third["FLUX_PORT"]) == ("3", "19002")
    ring = worker_env(tmp_path, 1, NUM_GPUS="8", FLUX_GPUS_PER_WORKER="4", FLUX_PARALLEL="ring")
    assert (ring["CUDA_VISIBLE_DEVICES"], ring["FLUX_PARALLEL"], ring["FLUX_PORT"]) == ("4,5,6,7", "ring", "19001")
    plain = worker_env(tmp_path, 5, NUM_GPUS="8")  # no -g: one GPU per worker, as before
    assert (plain["CUDA_VISIBLE_DEVICES"], plain["FLUX_PARALLEL"], plain["FLUX_PORT"]) == ("5", "off", "19005")


def test_nginx_gets_one_upstream_per_worker(tmp_path):
    result = script(tmp_path, "nginx-conf", "-g", "2", NUM_GPUS="8")
    assert result.returncode == 0, result.stderr
    assert re.findall(r"upstream flux_worker_(\d+)", result.stdout) == ["19000", "19001", "19002", "19003"]
    mixed = script(tmp_path, "nginx-conf", "-g", "2,2,1,1,1,1", "-m", "bf16,bf16,fp4,fp4,fp4,fp4", NUM_GPUS="8")
    assert mixed.returncode == 0, mixed.stderr
    assert len(re.findall(r"upstream flux_worker_\d+", mixed.stdout)) == 6


@pytest.mark.parametrize("args, env, message", [
    (["-g", "3"], {"NUM_GPUS": "8"}, "8 GPU(s) do not split into workers of 3"),
    (["-g", "2,2,2"], {"NUM_GPUS": "4"}, "needs 6 GPUs, but NUM_GPUS is 4"),
    (["-g", "2"], {"NUM_GPUS": "4", "FLUX_PARALLEL": "off"}, "FLUX_PARALLEL=off: use ulysses or ring"),
    (["-g", "two"], {"NUM_GPUS": "4"}, "-g must be the GPUs per worker"),
    (["-g", "2", "-m", "fp4,bf16,bf16"], {"NUM_GPUS": "4"}, "names 3 precisions"),
])
def test_groups_that_cannot_be_made_are_refused_with_the_reason(tmp_path, args, env, message):
    result = script(tmp_path, "nginx-conf", *args, **env)
    assert result.returncode != 0
    assert message in result.stderr
