#!/usr/bin/env python3
"""Copies a log stream from stdin to stdout line by line, every control character written as a visible escape.

nginx writes its error log as it is: a client's Referer (and the request line) appear in it byte for byte, so a
client could put terminal escape codes (ESC, 8-bit CSI) on the screen of an operator who tails it, and nginx has
no setting to escape them. start_multi_gpu.sh sends nginx's stderr through this filter into error.log. The rule
is the worker's own (api/logs.py escape_controls); bytes that are not UTF-8 become \\xNN. Each line is written as
soon as it is read, so the log stays live.

    nginx ... 2> >(python scripts/escape_log.py >>error.log)
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from api.logs import escape_controls  # noqa: E402  (stdlib only: cheap to import)


def escape_line(raw: bytes) -> bytes:
    """One line (with or without its newline) as printable text plus its newline."""
    body = raw[:-1] if raw.endswith(b"\n") else raw
    text = escape_controls(body.decode("utf-8", "backslashreplace"))
    return text.encode("utf-8") + b"\n"


def main() -> int:
    # nginx's last lines (its shutdown) come after a stop signal reached the group: end at end of input, which is
    # when the last nginx process has gone, never before
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    out = sys.stdout.buffer
    for raw in sys.stdin.buffer:
        try:
            out.write(escape_line(raw))
            out.flush()
        except BrokenPipeError:
            return 0
        except OSError:
            continue  # a full disk: this line is lost, as nginx's own write would have failed; the next may fit
    return 0


if __name__ == "__main__":
    sys.exit(main())
