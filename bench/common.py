"""What the benchmark programs share: run facts (card, versions, command), statistics, result files."""
from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import socket
from pathlib import Path
from typing import Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
SCHEMA = 1
# Dense bf16 matrix rate measured on one H100 SXM (an 8192³ product: 790 TFLOP/s, ../shared/PERF.md).
PEAK_BF16_TFLOPS = 790.0
VERSION_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "bitsandbytes", "torchao",
                    "fastapi", "uvicorn", "httpx")
MIB = 2**20
GIB = 2**30


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def package_versions() -> dict[str, str | None]:
    """Installed versions, read from package metadata (no import: bitsandbytes/torchao are slow and chatty)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def command_line(module: str, argv: Sequence[str]) -> str:
    return " ".join(["python", "-m", module, *map(shlex.quote, argv)])


def run_header(kind: str, name: str, module: str, argv: Sequence[str]) -> dict:
    """The fields every result file starts with; the card is filled in by whoever knows it."""
    now = utc_now()
    return {
        "kind": kind,
        "schema": SCHEMA,
        "name": name,
        "date": now.isoformat(),
        "stamp": now.strftime("%Y%m%dT%H%M%SZ"),
        "host": socket.gethostname(),
        "card": None,
        "versions": package_versions(),
        "command": command_line(module, argv),
    }


def safe_name(text: str) -> str:
    """A file-name part of letters, digits, '.', '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def write_result(result: dict, out_dir: str | os.PathLike | None = None, path: str | None = None) -> Path:
    """Writes `<out_dir>/<name>-<stamp>.json` (or `path`) atomically and returns where."""
    name = f"{safe_name(result['name'])}-{result['stamp']}.json"
    target = Path(path) if path else Path(out_dir or RESULTS_DIR) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(target)
    return target


def load_result(path: str | os.PathLike) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


# ---- statistics ---------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(values: Iterable[float]) -> dict:
    vals = list(values)
    if not vals:
        return {"n": 0}
    mean = sum(vals) / len(vals)
    return {
        "n": len(vals), "min": min(vals), "max": max(vals), "mean": mean,
        "median": percentile(vals, 50), "p50": percentile(vals, 50), "p90": percentile(vals, 90),
        "p95": percentile(vals, 95), "p99": percentile(vals, 99),
        "stdev": math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals)),
    }


# ---- GPU memory as the driver sees it -----------------------------------------------------------
class Nvml:
    """Device memory through NVML (nvidia-ml-py); every method returns None where NVML is unavailable."""

    def __init__(self):
        self.ok = False
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nv = pynvml
            self.ok = True
        except Exception:  # no driver, no package: the figures are simply absent
            self.nv = None

    def _handle(self, index: int | None = None, pci_bus_id: str | None = None):
        if pci_bus_id:
            return self.nv.nvmlDeviceGetHandleByPciBusId(pci_bus_id.encode())
        return self.nv.nvmlDeviceGetHandleByIndex(index or 0)

    def used_mib(self, index: int | None = None, pci_bus_id: str | None = None) -> float | None:
        if not self.ok:
            return None
        try:
            return round(self.nv.nvmlDeviceGetMemoryInfo(self._handle(index, pci_bus_id)).used / MIB, 1)
        except Exception:
            return None

    def process_used_mib(self, pid: int) -> float | None:
        """Memory NVML charges to one process on any GPU (None where pid namespaces hide it)."""
        if not self.ok:
            return None
        try:
            for i in range(self.nv.nvmlDeviceGetCount()):
                handle = self.nv.nvmlDeviceGetHandleByIndex(i)
                for proc in self.nv.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.pid == pid and proc.usedGpuMemory is not None:
                        return round(proc.usedGpuMemory / MIB, 1)
        except Exception:
            pass
        return None

    def devices(self) -> list[dict]:
        """Every GPU: index, name, used and total MiB."""
        if not self.ok:
            return []
        out = []
        try:
            for i in range(self.nv.nvmlDeviceGetCount()):
                handle = self.nv.nvmlDeviceGetHandleByIndex(i)
                mem = self.nv.nvmlDeviceGetMemoryInfo(handle)
                name = self.nv.nvmlDeviceGetName(handle)
                out.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                            "used_mib": round(mem.used / MIB, 1), "total_mib": round(mem.total / MIB, 1)})
        except Exception:
            pass
        return out

    def driver_version(self) -> str | None:
        if not self.ok:
            return None
        try:
            version = self.nv.nvmlSystemGetDriverVersion()
            return version.decode() if isinstance(version, bytes) else version
        except Exception:
            return None


def sig(value: float, digits: int = 4) -> float:
    """Rounded to significant digits: TFLOP/s of a CPU run stay readable instead of becoming 0.0."""
    return float(f"{value:.{digits}g}")


def fmt_rate(value, empty: str = "-") -> str:
    """A rate for a table: one decimal from 10 up, more below, so small figures do not print as 0.0."""
    if value is None:
        return empty
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"


def fmt(value, digits: int = 2, empty: str = "-") -> str:
    """A table cell: numbers rounded, None as a dash."""
    if value is None:
        return empty
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if math.isnan(value):
            return empty
        return f"{value:.{digits}f}"
    return str(value)
