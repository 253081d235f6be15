"""Structured log lines on stderr: one line per event, ``key=value`` after the event name.

Every message in the balancer starts with ``event=NAME`` and goes on with ``key=value`` pairs
(values with spaces are quoted with ``%r``), so ``grep event=connect_failed`` finds them all.
"""

from __future__ import annotations

import logging
import sys
import time


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        when += f".{int(record.msecs):03d}Z"
        line = f"{when} level={record.levelname.lower()} logger={record.name} {record.getMessage()}"
        if record.exc_info:  # a bug, not a user error: keep the trace on one line's neighbours
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: int = logging.INFO) -> None:
    """Send ``l4lb.*`` loggers to stderr in the one-line format (idempotent)."""
    root = logging.getLogger("l4lb")
    for handler in root.handlers:
        if getattr(handler, "_l4lb", False):
            return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    handler._l4lb = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
