"""What this machine can run, before any model is built: modules, GPU, fp8 support.

    python -m bench.preflight          prints one line per check; exit 1 when a module the worker needs is missing
    python -m bench.preflight --fp8    exit 0 only when torchao's float8 path can run here (Ada/Hopper, torchao)
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules the worker and the benchmarks import; a missing one fails the start, so say so up front.
# The second line names what fastapi, uvicorn and pydantic-settings import in turn, which wheels fetched with
# --no-deps leave out.
REQUIRED = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "sentencepiece", "PIL", "fastapi",
            "starlette", "uvicorn", "pydantic", "pydantic_settings", "httpx", "prometheus_client",
            "annotated_doc", "opentelemetry.trace", "click", "h11", "dotenv", "anyio")
OPTIONAL = ("bitsandbytes", "torchao", "pynvml")


def check_module(name: str) -> tuple[bool, str]:
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # ImportError, or a broken native extension
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return True, str(getattr(module, "__version__", ""))


def fp8_status() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "no torch"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    cap = torch.cuda.get_device_capability(0)
    if cap < (8, 9):
        return False, f"compute capability {cap[0]}.{cap[1]} < 8.9"
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow  # noqa: F401
    except Exception as exc:
        return False, f"torchao float8: {type(exc).__name__}: {exc}"[:200]
    return True, f"capability {cap[0]}.{cap[1]}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.preflight", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fp8", action="store_true", help="only check the fp8 path (exit status)")
    args = p.parse_args(argv)
    if args.fp8:
        ok, why = fp8_status()
        print(f"fp8: {'yes' if ok else 'no'} ({why})")
        return 0 if ok else 1
    missing = []
    for name in REQUIRED + OPTIONAL:
        ok, detail = check_module(name)
        print(f"{'ok  ' if ok else 'MISSING' if name in REQUIRED else 'absent'} {name} {detail}")
        if not ok and name in REQUIRED:
            missing.append(name)
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                cap = torch.cuda.get_device_capability(i)
                print(f"gpu {i}: {torch.cuda.get_device_name(i)}, capability {cap[0]}.{cap[1]}, "
                      f"CUDA {torch.version.cuda}")
        else:
            print("gpu: none visible to torch")
    except ImportError:
        pass
    ok, why = fp8_status()
    print(f"fp8: {'yes' if ok else 'no'} ({why})")
    if missing:
        print(f"missing modules: {' '.join(missing)} (carry their wheels: ../shared/tools/device-wheels.sh NAME...)")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
