"""Attention kernels on FLUX's shapes: which scaled-dot-product backend is fastest on this GPU.

    python -m bench.attention                       # 1024² (4096+512 tokens) and 512² (1024+512), bf16
    python -m bench.attention --tokens 4608 --batch 2 --json bench/results/attention.json

FLUX.1 attends jointly over text and image tokens: 24 heads of 128, 512 text tokens (256 for schnell) plus
(W/16)·(H/16) image tokens. For each backend PyTorch offers (flash, cuDNN, memory-efficient), the program
and for PyTorch's own choice among them (DEFAULT, what diffusers' "native" backend gets), it
times forward calls with CUDA events after a warm-up and prints milliseconds per call, achieved TFLOP/s
(4·B·H·S²·D per call) and the largest difference from the flash kernel's output. It needs a CUDA GPU.
"""
from __future__ import annotations

import sys

if not __package__:
    sys.exit("run it from the repository root as: python -m bench.attention ...")

import argparse
import contextlib

from bench.common import run_header, write_result

BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "DEFAULT")  # DEFAULT: PyTorch's choice


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="4608,1536", help="comma list of sequence lengths (text + image tokens)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--json", help="exact path of the JSON result")
    p.add_argument("--out-dir", help="folder of the JSON result (default bench/results)")
    args = p.parse_args(argv)

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    if not torch.cuda.is_available():
        print("bench.attention needs a CUDA GPU", file=sys.stderr)
        return 2
    result = run_header("bench.attention", "attention", "bench.attention", argv or sys.argv[1:])
    result.update({"card": torch.cuda.get_device_name(), "results": []})
    rows = []
    for tokens in [int(t) for t in args.tokens.split(",") if t.strip()]:
        shape = (args.batch, args.heads, tokens, args.head_dim)
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flop = 4 * args.batch * args.heads * tokens * tokens * args.head_dim
        reference = None
        for name in BACKENDS:
            row = {"tokens": tokens, "batch": args.batch, "backend": name}
            try:
                with contextlib.nullcontext() if name == "DEFAULT" else sdpa_kernel(getattr(SDPBackend, name)):
                    out = sdpa(q, k, v)
                    for _ in range(3):
                        sdpa(q, k, v)
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    torch.cuda.synchronize()
                    start.record()
                    for _ in range(args.iters):
                        sdpa(q, k, v)
                    end.record()
                    torch.cuda.synchronize()
                ms = start.elapsed_time(end) / args.iters
                if name == "DEFAULT":  # which kernel PyTorch picked
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                        sdpa(q, k, v)
                        torch.cuda.synchronize()
                    kernels = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
                    row["kernel"] = kernels[0].key[:120] if kernels else None
                if reference is None:
                    reference = out
                row.update(ms=round(ms, 4), tflops=round(flop / ms / 1e9, 1),
                           max_abs_diff=round(float((out.float() - reference.float()).abs().max()), 5))
            except RuntimeError as exc:  # a backend that does not support this shape or GPU
                row["error"] = str(exc).splitlines()[0][:200]
            rows.append(row)
            print(f"  S={tokens:5d} {name:20s} " + (f"{row['ms']:8.3f} ms {row['tflops']:7.1f} TFLOP/s "
                  f"diff {row['max_abs_diff']} {row.get('kernel') or ''}" if "ms" in row else row["error"]),
                  flush=True)
    result["results"] = rows
    print(f"\nresult: {write_result(result, args.out_dir, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
