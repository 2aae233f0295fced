"""Image encoding cost: what each output format adds to every request (CPU work after the GPU is done).

    python -m bench.encode                    # 1024², random pixels and a smooth gradient, 5 runs each
    python -m bench.encode --size 512 --runs 10 --json bench/results/encode.json

For png as served (api/png.py: row filter + ISA-L deflate, Pillow's fallback), png through Pillow (zlib levels
1 and 6), jpeg and webp at quality 90, the program encodes each image and prints milliseconds per encode (median) and the size of the file. Random pixels are
what the synthetic models render (incompressible: the worst case); the gradient stands in for a real photo.
"""
from __future__ import annotations

import sys

if not __package__:
    sys.exit("run it from the repository root as: python -m bench.encode ...")

import argparse
import io
import statistics
import time

from bench.common import run_header, write_result

CASES = (("png (served)", "api.png", {"compress_level": 1}), ("png Pillow 1", "PNG", {"compress_level": 1}),
         ("png level 6", "PNG", {"compress_level": 6}),
         ("jpeg", "JPEG", {"quality": 90}), ("webp", "WEBP", {"quality": 90, "method": 0}))


def images(size: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    gradient = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)),
                         np.full((size, size), 128, np.float32)], axis=-1).astype(np.uint8)
    return {"random pixels": Image.fromarray(noise), "gradient": Image.fromarray(gradient)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.encode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024, help="side of the square image (default %(default)s)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", help="exact path of the JSON result")
    p.add_argument("--out-dir", help="folder of the JSON result (default bench/results)")
    args = p.parse_args(argv)
    result = run_header("bench.encode", "encode", "bench.encode", argv if argv is not None else sys.argv[1:])
    result.update({"card": "cpu", "size": args.size, "results": []})
    print(f"{'image':14s} {'format':12s} {'ms':>8s} {'KiB':>8s}")
    for label, image in images(args.size).items():
        for name, fmt, options in CASES:
            times = []
            for _ in range(args.runs):
                buf = io.BytesIO()
                started = time.perf_counter()
                if fmt == "api.png":
                    from api.png import encode_png

                    buf.write(encode_png(image, **options))
                else:
                    image.save(buf, format=fmt, **options)
                times.append((time.perf_counter() - started) * 1000)
            row = {"image": label, "format": name, "ms": round(statistics.median(times), 1),
                   "kib": len(buf.getvalue()) // 1024}
            result["results"].append(row)
            print(f"{label:14s} {name:12s} {row['ms']:8.1f} {row['kib']:8d}")
    print(f"\nresult: {write_result(result, args.out_dir, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
