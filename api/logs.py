"""The worker's logging: one line per record, with every control character escaped.

Log records carry client strings (paths, headers, exception messages quoting a request). A raw CR/LF in one
would start a forged line (which `monitor_multi_gpu.sh --errors` or a log shipper reads as a record of its own),
and ESC/C1 bytes would drive an operator's terminal. So the formatter, not each call site, escapes: every
C0 control (tab included), DEL, every C1 control, the Unicode line/paragraph separators and the bidirectional
overrides become a visible \\xNN / \\uNNNN. The handler's own newline between records is the only one written,
and a traceback keeps its layout (the worker's own frames) while its exception messages are escaped like the rest.
"""
from __future__ import annotations

import logging
import sys
import traceback

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# code points that end a line or move the cursor somewhere: C0, DEL, C1, NEL/LS/PS, bidi embeddings/isolates
_UNSAFE = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029, *range(0x202A, 0x202F),
           *range(0x2066, 0x206A), 0xFEFF]
_ESCAPES = {cp: (f"\\x{cp:02x}" if cp < 0x100 else f"\\u{cp:04x}") for cp in _UNSAFE}


def escape_controls(text: str) -> str:
    """`text` with every control or line-breaking character written as a visible escape."""
    return text.translate(_ESCAPES)


def _escape_messages(te: traceback.TracebackException, seen: set[int]) -> None:
    """Escape the exception messages (client input may be quoted there) of a traceback and of its chain."""
    if id(te) in seen:
        return
    seen.add(id(te))
    if isinstance(getattr(te, "_str", None), str):
        te._str = escape_controls(te._str)
    notes = getattr(te, "__notes__", None)
    if notes:
        te.__notes__ = [escape_controls(str(n)) for n in notes]
    for linked in (te.__cause__, te.__context__, *(getattr(te, "exceptions", None) or ())):
        if linked is not None:
            _escape_messages(linked, seen)


class EscapingFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei) -> str:
        te = traceback.TracebackException(ei[0], ei[1], ei[2], capture_locals=False)
        _escape_messages(te, set())
        return "".join(te.format()).rstrip("\n")

    def formatStack(self, stack_info: str) -> str:
        return stack_info  # made by the logging module from our own frames


def configure_logging(level: str, stream=None) -> None:
    """Root logging for a worker: one escaping handler on stdout. uvicorn's own loggers (log_config=None)
    and Python warnings propagate here, so they are escaped too."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(EscapingFormatter(FORMAT))
    logging.addLevelName(5, "TRACE")  # uvicorn's level below DEBUG (FLUX_LOG_LEVEL=trace), unknown to logging
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)
