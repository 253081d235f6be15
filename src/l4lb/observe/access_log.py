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

Lines reach their target in whole-line writes (``write(2)``) of at most ``PIPE_BUF`` (4096)
bytes, so several worker processes sharing one stdout pipe (the journal) never cut a line into
another: the kernel keeps such a write to a pipe in one piece. A line longer than that (a long
``detail``, a long listener name) has every string value cut to 256 characters and
``"truncated": true`` added, so it still fits in one write and stays valid JSON.

The queue is bounded (:data:`MAX_QUEUED` lines), as HAProxy's log ring is: when the target does
not keep up (stdout not read), new lines are dropped and counted, never buffered without end.
The count is the process-wide :func:`dropped` (exported as ``l4lb_access_log_dropped_total``),
and the writer reports it on stderr (``event=access_log_dropped count=N total=M``) once it can
write again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec

from l4lb.balancer import logs

log = logging.getLogger("l4lb.access")

_STOP = object()
_REOPEN = object()
_BATCH = 256
PIPE_BUF = 4096
"""The largest write a pipe keeps whole (POSIX; Linux: 4096)."""
MAX_QUEUED = 65_536
"""Lines waiting for the writer before new ones are dropped (about 30 MB at most)."""
_CUT = 256


class _Dropped:
    """The process-wide count of access-log lines lost (queue full, unwritable, too long)."""

    __slots__ = ("lock", "total")

    def __init__(self) -> None:
        self.total = 0
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.total += n


_DROPPED = _Dropped()


def dropped() -> int:
    """Access-log lines this process dropped since it started (across reloads)."""
    return _DROPPED.total


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fit(item: dict[str, Any], encode: Callable[[Any], bytes]) -> bytes | None:
    """One line (newline included) of at most PIPE_BUF bytes, or None if it cannot fit."""
    line = encode(item) + b"\n"
    if len(line) <= PIPE_BUF:
        return line
    cut = {k: v[:_CUT] if isinstance(v, str) else v for k, v in item.items()}
    cut["truncated"] = True
    line = encode(cut) + b"\n"
    return line if len(line) <= PIPE_BUF else None


def chunks(lines: list[bytes]) -> list[bytes]:
    """Whole lines (each at most PIPE_BUF) joined into writes of at most PIPE_BUF bytes."""
    out: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for line in lines:
        if size + len(line) > PIPE_BUF and current:
            out.append(b"".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        out.append(b"".join(current))
    return out


def _write_all(fd: int, data: bytes) -> None:
    """One write(2) for a pipe (at most PIPE_BUF: all or nothing); a file may take several."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class AccessLog:
    """Where access lines go: ``"stdout"``, ``"off"`` or a file path (appended to)."""

    __slots__ = ("_fd", "_queue", "_thread", "enabled", "max_queued", "target")

    def __init__(self, target: str, max_queued: int = MAX_QUEUED) -> None:
        self.target = target
        self.max_queued = max_queued
        self.enabled = target != "off"
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._fd = -1
        if self.enabled:
            self._fd = self._open()
            self._thread = threading.Thread(target=self._run, name="l4lb-access-log", daemon=True)
            self._thread.start()

    def _open(self) -> int:
        if self.target == "stdout":
            with contextlib.suppress(OSError, ValueError, AttributeError):  # None: closed
                sys.stdout.flush()  # whatever was printed before comes first
            return 1
        return os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)

    def write(self, record: dict[str, Any]) -> None:
        """Queue one line; ``time`` is added now (the close time) if absent.

        Never blocks: past ``max_queued`` waiting lines, the line is dropped and counted.
        """
        if self.enabled:
            if self._queue.qsize() >= self.max_queued:
                _DROPPED.add(1)
                return
            if "time" not in record:
                record["time"] = time.time()
            worker = logs.worker_index()
            if worker is not None:
                record["worker"] = worker
            self._queue.put(record)

    def _run(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())  # for the main thread
        encode = msgspec.json.Encoder().encode
        get = self._queue.get
        reported = _DROPPED.total
        failing = ""
        while True:
            items = [get()]
            with contextlib.suppress(queue.Empty):
                while len(items) < _BATCH:
                    items.append(self._queue.get_nowait())
            stop = False
            lines: list[bytes] = []
            for item in items:
                if item is _STOP:
                    stop = True
                    continue
                if item is _REOPEN:  # lines queued before it go to the file they were for
                    failing = self._flush(lines, failing)
                    lines = []
                    self._reopen_now()
                    continue
                item["time"] = _iso(item["time"])
                line = _fit(item, encode)
                if line is None:
                    _DROPPED.add(1)
                else:
                    lines.append(line)
            failing = self._flush(lines, failing)
            total = _DROPPED.total
            if total != reported and not failing:
                log.warning(
                    "event=access_log_dropped count=%d total=%d target=%s detail=%r",
                    total - reported,
                    total,
                    self.target,
                    "the access log did not keep up (queue full or write failed): lines lost",
                )
                reported = total
            if stop:
                if self._fd > 2:
                    os.close(self._fd)
                return

    def _flush(self, lines: list[bytes], failing: str) -> str:
        """Write ``lines``; the error being reported now ("" once writes succeed again)."""
        for chunk in chunks(lines):
            try:
                _write_all(self._fd, chunk)
            except OSError as err:  # EPIPE (stdout closed), ENOSPC, EBADF: count and go on
                _DROPPED.add(chunk.count(b"\n"))
                if str(err) != failing:
                    failing = str(err)
                    log.error(
                        "event=access_log_write_failed target=%s error=%r", self.target, failing
                    )
            else:
                failing = ""
        return failing

    def reopen(self) -> None:
        """Reopen the file by its name (after logrotate moved it); queued lines keep their
        order: those queued before go to the old file, those after to the new one."""
        if self._thread is not None and self.target != "stdout":
            self._queue.put(_REOPEN)

    def _reopen_now(self) -> None:
        try:
            fd = self._open()
        except OSError as err:  # keep writing to the old file rather than lose lines
            log.error(
                "event=access_log_reopen_failed target=%s error=%r detail=%r",
                self.target,
                err.strerror or str(err),
                "still writing to the file opened before",
            )
            return
        old, self._fd = self._fd, fd
        if old > 2:
            os.close(old)
        log.info("event=access_log_reopened target=%s", self.target)

    def close(self, timeout: float = 5.0, wait: bool = True) -> None:
        """Write what is queued, then stop the writer (idempotent); ``wait`` for it to finish."""
        thread = self._thread
        if thread is not None:
            self._thread = None
            self._queue.put(_STOP)
            if wait:
                thread.join(timeout)
