"""Tables of benchmark results, as plain text for the terminal and as Markdown for docs/BENCHMARKS.md."""
from __future__ import annotations

from typing import Sequence

from bench.common import fmt, fmt_rate

Table = tuple[str, list[str], list[list[str]]]  # title, headers, rows


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = "  ".join(str(h).rjust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ---- raw ----------------------------------------------------------------------------------------
def raw_summary(result: dict) -> str:
    cfg = result.get("config", {})
    mem = result.get("memory_after_load") or {}
    parts = [f"{cfg.get('model')} {cfg.get('precision')}{' compiled' if cfg.get('compile') else ''}",
             f"on {result.get('card')}", f"load {fmt(result.get('load_s'), 1)} s"]
    if result.get("resident_gib") is not None:
        parts.append(f"resident {fmt(result['resident_gib'])} GiB (torch), "
                     f"{fmt((mem.get('nvml_used_mib') or 0) / 1024 if mem.get('nvml_used_mib') else None)} GiB (nvml)")
    checks = result.get("checks")
    if checks:
        parts.append(f"resident <= {checks['max_resident_gib']} GiB: {fmt(checks['resident_ok'])}")
    return "raw: " + ", ".join(parts)


def raw_tables(result: dict) -> list[Table]:
    headers = ["case", "bs", "median s", "s/img", "img/s", "TFLOP/s", "%peak", "limit s/img", "x limit",
               "peak GiB", "warm-up s"]
    rows = []
    for r in result.get("results", []):
        rows.append([f"{r['width']}x{r['height']}/{r['steps']}", str(r["batch"]), fmt(r["median_s"], 3),
                     fmt(r["s_per_img"], 3), fmt(r["img_per_s"], 3), fmt_rate(r["tflops"]), fmt(r["pct_peak"], 1),
                     fmt_rate(r["limit_s_per_img"]), fmt(r["x_limit"]), fmt(r["peak_gib"]),
                     fmt(r["warmup_s"][0] if r["warmup_s"] else None, 1)])
    tables: list[Table] = [("", headers, rows)]
    profiled = [r for r in result.get("results", []) if r.get("phases")]
    if profiled:
        p_headers = ["case", "bs", "total s", "text enc s", "denoise s", "per step ms", "vae decode s", "to PIL s",
                     "other s", "denoise TFLOP/s"]
        p_rows = []
        for r in profiled:
            ph = r["phases"]
            per_step = ph.get("denoise_per_step")
            p_rows.append([f"{r['width']}x{r['height']}/{r['steps']}", str(r["batch"]), fmt(ph["total"], 3),
                           fmt(ph["text_encode"], 3), fmt(ph["denoise"], 3),
                           fmt(per_step * 1000 if per_step else None, 1), fmt(ph["vae_decode"], 3),
                           fmt(ph["postprocess"], 3), fmt(ph["other"], 3), fmt_rate(ph.get("denoise_tflops"))])
        tables.append(("where the time goes (one extra call, synchronized at each phase)", p_headers, p_rows))
    return tables


# ---- http ---------------------------------------------------------------------------------------
def http_summary(result: dict) -> str:
    cfg = result.get("config", {})
    return (f"http: {cfg.get('url')}{cfg.get('path', '')} {cfg.get('model') or ''} on {result.get('card')}, "
            f"{cfg.get('width')}x{cfg.get('height')}, {cfg.get('steps') or 'default'} steps")


def http_tables(result: dict) -> list[Table]:
    headers = ["GPUs", "load", "ok", "err", "img/s", "s/img", "p50 s", "p95 s", "p99 s", "queue p50 ms",
               "gen p50 ms", "TFLOP/s/GPU", "%peak", "e2e/raw", "vs best batch", "scaling"]
    rows = []
    for lvl in result.get("levels", []):
        lat = lvl.get("latency_s", {})
        rows.append([str(lvl.get("gpus", 1)), lvl["load"], str(lvl["ok"]), str(lvl["errors_total"]),
                     fmt(lvl["img_per_s"], 3), fmt(lvl["s_per_img"], 3), fmt(lat.get("p50"), 3),
                     fmt(lat.get("p95"), 3), fmt(lat.get("p99"), 3), fmt(lvl.get("queue_ms_p50"), 0),
                     fmt(lvl.get("generate_ms_p50"), 0), fmt_rate(lvl.get("tflops_per_gpu")),
                     fmt(lvl.get("pct_peak"), 1), fmt(lvl.get("e2e_raw_ratio"), 3),
                     fmt(lvl.get("vs_best_batch"), 3), fmt(lvl.get("scaling_efficiency"), 3)])
    tables: list[Table] = [("", headers, rows)]
    dist_rows = []
    for lvl in result.get("levels", []):
        workers = ", ".join(f"{k}: {v}" for k, v in sorted(lvl.get("per_worker", {}).items()))
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(lvl.get("errors", {}).items()))
        dist_rows.append([str(lvl.get("gpus", 1)), lvl["load"], workers or "-", errors or "-"])
    if dist_rows:
        tables.append(("requests per worker, errors by status", ["GPUs", "load", "per worker", "errors"], dist_rows))
    return tables


def tables_for(result: dict) -> tuple[str, list[Table]]:
    kind = result.get("kind")
    if kind == "bench.raw":
        return raw_summary(result), raw_tables(result)
    if kind == "bench.http":
        return http_summary(result), http_tables(result)
    raise ValueError(f"not a benchmark result: kind={kind!r}")


def render(result: dict, markdown: bool = False) -> str:
    summary, tables = tables_for(result)
    out = [summary]
    for title, headers, rows in tables:
        out.append("")
        if title:
            out.append(f"{title}:" if not markdown else f"*{title}*")
            if markdown:
                out.append("")
        out.append(markdown_table(headers, rows) if markdown else text_table(headers, rows))
    errors = result.get("errors")
    if errors:
        out.append("")
        out += [f"error: {e}" if isinstance(e, str) else "error: " + ", ".join(f"{k}={v}" for k, v in e.items())
                for e in errors]
    return "\n".join(out)
