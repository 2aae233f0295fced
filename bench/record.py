"""Appends benchmark results to docs/BENCHMARKS.md as Markdown sections.

    python -m bench.record bench/results/raw-flux.1-dev-bf16-20261127T101500Z.json
    python -m bench.record suite-20261127T101500Z.json --note "first run of the suite on H100"

Each section carries the card, date, versions and command that made the figures, then their table.
A suite file (bench/gpu_suite.sh) becomes one section: its summary table, then one sub-section per item.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import report, suite
from bench.common import REPO_ROOT, load_result

DEFAULT_DOC = REPO_ROOT / "docs" / "BENCHMARKS.md"
DOC_HEADER = """# Benchmarks

Every result here was made by a program in `bench/` and appended by `python -m bench.record <result.json>`,
with the card, date, versions and the exact command. `bench/README.md` says how to run them.
"""
VERSION_ORDER = ("torch", "diffusers", "transformers", "accelerate", "bitsandbytes", "torchao", "fastapi",
                 "uvicorn", "httpx", "python")


def versions_line(versions: dict) -> str:
    names = [n for n in VERSION_ORDER if n in versions] + [n for n in versions if n not in VERSION_ORDER]
    return ", ".join(f"{n} {versions[n]}" for n in names if versions.get(n))


def facts(doc: dict, source: str | None, note: str | None) -> list[str]:
    device = doc.get("device") or {}
    card = doc.get("card") or "unknown"
    extra = ", ".join(f"{k} {device[k]}" for k in ("driver", "cuda", "capability") if device.get(k))
    lines = [f"- card: {card}" + (f" ({extra})" if extra else ""), f"- date: {doc.get('date')}",
             f"- versions: {versions_line(doc.get('versions') or {})}", f"- command: `{doc.get('command')}`"]
    if source:
        lines.append(f"- result file: `{source}`")
    if note:
        lines.append(f"- note: {note}")
    return lines


def section(doc: dict, source: str | None = None, title: str | None = None, note: str | None = None) -> str:
    date = (doc.get("date") or "")[:10]
    out = [f"## {title or doc.get('name')} — {doc.get('card') or 'unknown card'}, {date}", ""]
    out += facts(doc, source, note)
    out.append("")
    if doc.get("kind") == "bench.suite":
        out.append(suite.render(doc, markdown=True))
        for item in doc.get("items", []):
            out += ["", f"### {item['item']} ({item['status']}, {item['seconds']:.0f} s)", ""]
            if item.get("message"):
                out += [f"{item['message']}", ""]
            if item.get("result"):
                out += [f"`{item['result'].get('command')}`", "", report.render(item["result"], markdown=True)]
    else:
        out.append(report.render(doc, markdown=True))
    return "\n".join(out).rstrip() + "\n"


def append(doc_path: Path, text: str) -> None:
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    existing = doc_path.read_text(encoding="utf-8") if doc_path.exists() else DOC_HEADER
    if not existing.endswith("\n"):
        existing += "\n"
    doc_path.write_text(existing + "\n" + text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.record", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="result JSON files (bench.raw, bench.http or a suite file)")
    p.add_argument("--doc", default=str(DEFAULT_DOC), help="Markdown file to append to (default %(default)s)")
    p.add_argument("--title", help="section title (default: the result's name)")
    p.add_argument("--note", help="one line added under the facts, e.g. what changed since the last run")
    p.add_argument("--print", action="store_true", help="print the sections instead of appending them")
    args = p.parse_args(argv)
    for path in args.results:
        doc = load_result(path)
        try:
            source = str(Path(path).resolve().relative_to(REPO_ROOT))
        except ValueError:
            source = Path(path).name
        text = section(doc, source, args.title, args.note)
        if args.print:
            print(text)
        else:
            append(Path(args.doc), text)
            print(f"appended {doc.get('name')} ({doc.get('kind')}) to {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
