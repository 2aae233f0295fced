"""Gathers the items of one bench/gpu_suite.sh run into one JSON file and prints the compact summary.

    python -m bench.suite --status STATUS_FILE --out suite.json [--command "..."]

The status file has one tab-separated line per item: name, ok|failed|skipped, seconds, result JSON path
(or -), message. Runs in a fraction of a second (no torch import), so the suite calls it after every item
and a run cut short still leaves a complete file behind.
"""
from __future__ import annotations

import argparse
import sys

from bench.common import fmt, fmt_rate, load_result, run_header, write_result
from bench.report import markdown_table, text_table

# Targets of ../shared/PERF.md (served end to end through HTTP on an H100; shown next to raw figures too,
# so the distance is visible). Keyed by (precision or None for any, width, height, steps): seconds per image.
TARGETS_S_PER_IMG = {
    ("bf16", 1024, 1024, 28): 3.3,
    ("fp8", 1024, 1024, 28): 2.3,
    ("fp4", 1024, 1024, 28): 5.3,
    (None, 1024, 1024, 4): 0.45,
}
TARGET_E2E_RAW = 0.97
TARGET_FP4_RESIDENT_GIB = 9.0


def target_s(precision: str | None, width: int, height: int, steps: int) -> float | None:
    return TARGETS_S_PER_IMG.get((precision, width, height, steps), TARGETS_S_PER_IMG.get((None, width, height, steps)))


def read_status(path: str) -> list[dict]:
    items = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            name, status, seconds, result_path, message = (line.rstrip("\n").split("\t") + [""] * 5)[:5]
            item = {"item": name, "status": status, "seconds": float(seconds or 0), "message": message}
            if result_path and result_path != "-":
                item["result_file"] = result_path
                try:
                    item["result"] = load_result(result_path)
                except (OSError, ValueError) as exc:
                    item["message"] = (message + f"; result unreadable: {exc}").strip("; ")
            items.append(item)
    return items


def summary_rows(items: list[dict]) -> tuple[list[str], list[list[str]]]:
    headers = ["item", "case", "s/img", "img/s", "p50 s", "TFLOP/s", "%peak", "resident GiB", "peak GiB",
               "load s", "warm-up s", "e2e/raw", "target", "meets"]
    rows = []
    for item in items:
        res = item.get("result")
        if not res:
            rows.append([item["item"], item["status"], *["-"] * (len(headers) - 3), item["message"][:60] or "-"])
            continue
        if res["kind"] == "bench.raw":
            cfg = res["config"]
            for r in res["results"]:
                limit = target_s(cfg["precision"], r["width"], r["height"], r["steps"])
                meets = r["s_per_img"] <= limit if limit else None
                if cfg["precision"] == "fp4" and limit and res.get("resident_gib") is not None:
                    meets = meets and res["resident_gib"] <= TARGET_FP4_RESIDENT_GIB
                rows.append([item["item"], f"{r['width']}x{r['height']}/{r['steps']} bs{r['batch']}",
                             fmt(r["s_per_img"], 3), fmt(r["img_per_s"], 3), "-", fmt_rate(r["tflops"]),
                             fmt(r["pct_peak"], 1), fmt(res.get("resident_gib")), fmt(r["peak_gib"]),
                             fmt(res.get("load_s"), 1), fmt(r["warmup_s"][0] if r["warmup_s"] else None, 1), "-",
                             f"<= {limit} s" + (f", <= {TARGET_FP4_RESIDENT_GIB:g} GiB" if cfg["precision"] == "fp4"
                                                 else "") if limit else "-", fmt(meets)])
            for err in res.get("errors", []):
                rows.append([item["item"], str(err.get("case", "?")) if isinstance(err, dict) else "?", "failed",
                             *["-"] * (len(headers) - 4), "-"])
        elif res["kind"] == "bench.http":
            cfg = res["config"]
            for lvl in res["levels"]:
                ratio = lvl.get("e2e_raw_ratio")
                rows.append([item["item"], f"{cfg['width']}x{cfg['height']}/{cfg['steps']} {lvl['gpus']}GPU "
                             f"{lvl['load']}", fmt(lvl["s_per_img"], 3), fmt(lvl["img_per_s"], 3),
                             fmt(lvl["latency_s"].get("p50"), 3), fmt_rate(lvl.get("tflops_per_gpu")),
                             fmt(lvl.get("pct_peak"), 1), "-", "-",
                             fmt(next((s.get("ready_s") for s in res["stacks"] if s["gpus"] == lvl["gpus"]), None), 1),
                             "-", fmt(ratio, 3), f">= {TARGET_E2E_RAW} x raw" if ratio is not None else "-",
                             fmt(ratio >= TARGET_E2E_RAW if ratio is not None else None)])
            for row in res.get("scaling", []):
                if len(res.get("scaling", [])) > 1:
                    rows.append([item["item"], f"scaling {row['gpus']} GPU", "-", fmt(row["best_img_per_s"], 3),
                                 *["-"] * 8, ">= 0.95", fmt(row["efficiency"] >= 0.95 if row["efficiency"] else None)])
        if item["status"] != "ok":
            rows.append([item["item"], item["status"], *["-"] * (len(headers) - 3), item["message"][:60] or "-"])
    return headers, rows


def build(items: list[dict], command: str) -> dict:
    doc = run_header("bench.suite", "gpu-suite", "bench.suite", [])
    doc["command"] = command
    first = next((i["result"] for i in items if i.get("result")), None)
    if first:
        doc["card"], doc["versions"] = first.get("card"), first.get("versions", doc["versions"])
        doc["device"] = first.get("device")
    doc["items"] = items
    return doc


def render(doc: dict, markdown: bool = False) -> str:
    headers, rows = summary_rows(doc["items"])
    return markdown_table(headers, rows) if markdown else text_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--status", required=True, help="the suite's status file")
    p.add_argument("--out", required=True, help="where the combined JSON goes")
    p.add_argument("--command", default="bench/gpu_suite.sh", help="how the suite was run")
    p.add_argument("--quiet", action="store_true", help="write the file, print nothing")
    args = p.parse_args(argv)
    doc = build(read_status(args.status), args.command)
    write_result(doc, path=args.out)
    if not args.quiet:
        print(f"suite: {doc.get('card')}, {doc['date']}, {args.out}")
        print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
