"""The access log: one JSON line per connection when it closes, and one per rejection.

The event loop only builds a small dict and puts it on a queue; a writer thread encodes the
lines, writes them in batches and flushes, so a slow disk or a full stdout pipe never blocks
the loop. ``access = "off"`` costs nothing.

Connection line keys: ``time`` (ISO 8601 UTC, when it closed), ``event`` ("connection"),
``listener``, ``client`` (real ``ip:port``), ``upstream`` (the trusted proxy it came through, or
null), ``backend`` (or null), ``proxy`` (``v1``, ``v2`` or ``off``), ``unique_id``,
``bytes_from_client``, ``bytes_to_client``, ``duration`` (seconds), ``end`` (why it ended) and
``detail`` (more about it, when there is more).

Rejection line keys: ``time``, ``event`` ("rejected"), ``listener``, ``peer`` (the socket's peer),
``client`` (the claimed client, if a header was read), ``reason``, ``detail``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading
import time
from datetime import UTC, datetime
from typing import IO, Any

import msgspec

log = logging.getLogger("l4lb.access")

_STOP = object()
_BATCH = 256


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AccessLog:
    """Where access lines go: ``"stdout"``, ``"off"`` or a file path (appended to)."""

    __slots__ = ("_queue", "_thread", "enabled", "target")

    def __init__(self, target: str) -> None:
        self.target = target
        self.enabled = target != "off"
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if self.enabled:
            stream = self._open()
            self._thread = threading.Thread(
                target=self._run, args=(stream,), name="l4lb-access-log", daemon=True
            )
            self._thread.start()

    def _open(self) -> IO[bytes]:
        if self.target == "stdout":
            return sys.stdout.buffer
        return open(self.target, "ab")

    def write(self, record: dict[str, Any]) -> None:
        """Queue one line; ``time`` is added now (the close time) if absent."""
        if self.enabled:
            if "time" not in record:
                record["time"] = time.time()
            self._queue.put(record)

    def _run(self, stream: IO[bytes]) -> None:
        encode = msgspec.json.Encoder().encode
        get = self._queue.get
        while True:
            items = [get()]
            with contextlib.suppress(queue.Empty):
                while len(items) < _BATCH:
                    items.append(self._queue.get_nowait())
            stop = False
            lines = []
            for item in items:
                if item is _STOP:
                    stop = True
                    continue
                item["time"] = _iso(item["time"])
                lines.append(encode(item))
            if lines:
                try:
                    stream.write(b"\n".join(lines) + b"\n")
                    stream.flush()
                except (OSError, ValueError) as err:
                    log.error("event=access_log_write_failed target=%s error=%r", self.target, err)
            if stop:
                if stream is not sys.stdout.buffer:
                    stream.close()
                return

    def close(self, timeout: float = 5.0, wait: bool = True) -> None:
        """Write what is queued, then stop the writer (idempotent); ``wait`` for it to finish."""
        thread = self._thread
        if thread is not None:
            self._thread = None
            self._queue.put(_STOP)
            if wait:
                thread.join(timeout)
