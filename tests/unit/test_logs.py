"""The worker's log formatter (api/logs.py): one line per record, no control character from anyone."""
from __future__ import annotations

import io
import logging
import re

import pytest

from api.logs import EscapingFormatter, FORMAT, escape_controls

UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")


@pytest.fixture
def log():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(EscapingFormatter(FORMAT))
    logger = logging.getLogger("flux.test-logs")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield logger, stream
    logger.removeHandler(handler)


@pytest.mark.parametrize("hostile", ["a\nb", "a\r\nb", "\x1b[31mred", "nul\x00", "del\x7f", "nel\x85", "csi\x9b",
                                     "ls\u2028ps\u2029", "rtl\u202e", "tab\there", "bom\ufeff"])
def test_every_control_character_is_escaped_visibly(log, hostile):
    logger, stream = log
    logger.info("path=%s", hostile)
    out = stream.getvalue()
    assert out.count("\n") == 1 and out.endswith("\n")
    assert not UNSAFE.search(out[:-1]), repr(out)
    assert escape_controls(hostile) in out and "\\" in escape_controls(hostile)


def test_a_traceback_keeps_its_lines_but_its_messages_are_escaped(log):
    logger, stream = log
    try:
        try:
            raise RuntimeError("inner\n2026-01-01 00:00:00,000 ERROR forged")
        except RuntimeError as exc:
            raise ValueError("outer\r\n\x1b[2Jforged") from exc
    except ValueError:
        logger.exception("failed on %s", "/x\n")
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("failed on /x\\x0a")
    assert lines[1] == "Traceback (most recent call last):"
    assert not any(line.startswith("2026-01-01") for line in lines)
    assert any(line.startswith("RuntimeError: inner\\x0a2026-01-01") for line in lines), lines
    assert any(line == "ValueError: outer\\x0d\\x0a\\x1b[2Jforged" for line in lines), lines
    assert not UNSAFE.search("".join(lines))
