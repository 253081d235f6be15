"""The access log: one JSON line per connection when it closes, and one per rejection.

The event loop only builds a small dict and puts it on a queue; a writer thread encodes the
lines, writes them in batches and flushes, so a slow disk, a full stdout pipe or a syslog
collector never blocks the loop. ``access = "off"`` costs nothing.

Targets: ``"stdout"``, a file path, or syslog (``"syslog:/dev/log"``,
``"syslog+udp://IP:PORT"``, ``"syslog+tcp://IP:PORT"``): one RFC 5424 message per line, MSGID
``access``, the JSON line as MSG, severity warning for a rejection or a connection that could
not be served, info otherwise (:mod:`l4lb.observe.syslog` has the format and the transports).

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

Over syslog each line is one message, never split: one longer than the transport's limit has
its strings cut as above, then its end cut (RFC 5424 section 6.1). Lines the collector cannot
take (down, refusing, not reading for 5 s) are dropped and counted like the others.

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
from l4lb.balancer.relay_contract import EndReason
from l4lb.observe import syslog

log = logging.getLogger("l4lb.access")

_STOP = object()
_REOPEN = object()
_BATCH = 256
PIPE_BUF = 4096
"""The largest write a pipe keeps whole (POSIX; Linux: 4096)."""
MAX_QUEUED = 65_536
"""Lines waiting for the writer before new ones are dropped (about 30 MB at most)."""
_CUT = 256
MSGID = "access"
"""The syslog MSGID of access-log lines (``:msgid, isequal, "access"`` in rsyslog)."""


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


def _fit(
    item: dict[str, Any], encode: Callable[[Any], bytes], limit: int = PIPE_BUF, end: bytes = b"\n"
) -> bytes:
    """One line (``end`` included) of at most ``limit`` bytes, its strings cut to 256
    characters (and ``"truncated": true``) if it is longer; still longer when even that is."""
    line = encode(item) + end
    if len(line) <= limit:
        return line
    cut = {k: v[:_CUT] if isinstance(v, str) else v for k, v in item.items()}
    cut["truncated"] = True
    return encode(cut) + end


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


def _open_file(target: str) -> int:
    if target == "stdout":
        with contextlib.suppress(OSError, ValueError, AttributeError):  # None: closed
            sys.stdout.flush()  # whatever was printed before comes first
        return 1
    return os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)


_WARNING_ENDS = frozenset(
    {
        EndReason.NO_BACKEND,
        EndReason.CONNECT_FAILED,
        EndReason.NO_ROUTE,
        EndReason.HEADER_ERROR,
        EndReason.ERROR,
    }
)
"""Connection ends that are the balancer's failure to serve (syslog severity warning)."""


def severity(record: dict[str, Any]) -> syslog.Severity:
    """A line's syslog severity: warning for a rejection or a connection the balancer could
    not serve (no backend, every connect failed, no route, an error), info otherwise."""
    if record.get("event") == "rejected" or record.get("end") in _WARNING_ENDS:
        return syslog.Severity.WARNING
    return syslog.Severity.INFO


class _FileSink:
    """Whole-line writes to a file descriptor: a file (reopened by name) or stdout."""

    __slots__ = ("failing", "fd", "target")

    def __init__(self, target: str, fd: int) -> None:
        self.target = target
        self.fd = fd
        self.failing = ""
        """The error being reported now ("" once writes succeed again)."""

    def deliver(self, items: list[dict[str, Any]], encode: Callable[[Any], bytes]) -> bool:
        lines: list[bytes] = []
        for item in items:
            item["time"] = _iso(item["time"])
            line = _fit(item, encode)
            if len(line) > PIPE_BUF:
                _DROPPED.add(1)
            else:
                lines.append(line)
        for chunk in chunks(lines):
            try:
                _write_all(self.fd, chunk)
            except OSError as err:  # EPIPE (stdout closed), ENOSPC, EBADF: count and go on
                _DROPPED.add(chunk.count(b"\n"))
                if str(err) != self.failing:
                    self.failing = str(err)
                    log.error(
                        "event=access_log_write_failed target=%s error=%r",
                        self.target,
                        self.failing,
                    )
            else:
                self.failing = ""
        return not self.failing

    def reopen(self) -> None:
        try:
            fd = _open_file(self.target)
        except OSError as err:  # keep writing to the old file rather than lose lines
            log.error(
                "event=access_log_reopen_failed target=%s error=%r detail=%r",
                self.target,
                err.strerror or str(err),
                "still writing to the file opened before",
            )
            return
        old, self.fd = self.fd, fd
        if old > 2:
            os.close(old)
        log.info("event=access_log_reopened target=%s", self.target)

    def close(self) -> None:
        if self.fd > 2:
            os.close(self.fd)


def _report(level: int, message: str) -> None:
    log.log(level, message)


class _SyslogSink:
    """One RFC 5424 message per line (MSGID ``access``), sent by :class:`syslog.Sender`."""

    __slots__ = ("header", "sender")

    def __init__(self, target: syslog.Target, facility: str, tag: str) -> None:
        self.header = syslog.Header.here(facility, tag)  # in the writer: this worker's pid
        self.sender = syslog.Sender(target, _report)
        self.sender.connect()

    def deliver(self, items: list[dict[str, Any]], encode: Callable[[Any], bytes]) -> bool:
        sender = self.sender
        limit = sender.limit
        render = self.header.render
        messages = []
        for item in items:
            when = item["time"]
            item["time"] = _iso(when)
            head = render(severity(item), when, MSGID)
            body = _fit(item, encode, limit - len(head), b"")
            messages.append(syslog.message(head, body, limit))
        lost = len(messages) - sender.send_many(messages)
        if lost:
            _DROPPED.add(lost)
        return not sender.failing

    def reopen(self) -> None:
        self.sender.reopen()
        log.info("event=access_log_reopened target=%s", self.sender.target)

    def close(self) -> None:
        self.sender.close()


class AccessLog:
    """Where access lines go: ``"stdout"``, ``"off"``, a file path (appended to), or a syslog
    target (``"syslog:/dev/log"``, ``"syslog+udp://IP:PORT"``, ``"syslog+tcp://IP:PORT"``,
    see :mod:`l4lb.observe.syslog`) with its ``facility`` and ``tag``."""

    __slots__ = (
        "_fd",
        "_queue",
        "_thread",
        "enabled",
        "facility",
        "max_queued",
        "syslog",
        "tag",
        "target",
    )

    def __init__(
        self,
        target: str,
        max_queued: int = MAX_QUEUED,
        *,
        facility: str = "local0",
        tag: str = "l4lb",
    ) -> None:
        self.target = target
        self.max_queued = max_queued
        self.facility = facility
        self.tag = tag
        self.enabled = target != "off"
        self.syslog = syslog.parse_target(target) if syslog.is_target(target) else None
        """The syslog target, or None for a file or stdout."""
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._fd = -1
        if self.enabled:
            if self.syslog is None:  # a file that cannot be opened is refused here, at once
                self._fd = _open_file(self.target)
            # a syslog collector is connected by the writer: a down one never holds the loop
            self._thread = threading.Thread(target=self._run, name="l4lb-access-log", daemon=True)
            self._thread.start()

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

    def _sink(self) -> _FileSink | _SyslogSink:
        if self.syslog is not None:
            return _SyslogSink(self.syslog, self.facility, self.tag)
        return _FileSink(self.target, self._fd)

    def _run(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())  # for the main thread
        encode = msgspec.json.Encoder().encode
        get = self._queue.get
        sink = self._sink()
        reported = _DROPPED.total
        while True:
            items = [get()]
            with contextlib.suppress(queue.Empty):
                while len(items) < _BATCH:
                    items.append(self._queue.get_nowait())
            stop = False
            batch: list[dict[str, Any]] = []
            for item in items:
                if item is _STOP:
                    stop = True
                elif item is _REOPEN:  # lines queued before it go where they were bound for
                    sink.deliver(batch, encode)
                    batch = []
                    sink.reopen()
                else:
                    batch.append(item)
            healthy = sink.deliver(batch, encode)
            total = _DROPPED.total
            if total != reported and healthy:
                log.warning(
                    "event=access_log_dropped count=%d total=%d target=%s detail=%r",
                    total - reported,
                    total,
                    self.target,
                    "the access log did not keep up (queue full, write failed or collector "
                    "down): lines lost",
                )
                reported = total
            if stop:
                sink.close()
                return

    def reopen(self) -> None:
        """Reopen the file by its name (after logrotate moved it), or reconnect to the syslog
        collector; queued lines keep their order: those queued before go to the old file (or
        connection), those after to the new one."""
        if self._thread is not None and self.target != "stdout":
            self._queue.put(_REOPEN)

    def close(self, timeout: float = 5.0, wait: bool = True) -> None:
        """Write what is queued, then stop the writer (idempotent); ``wait`` for it to finish."""
        thread = self._thread
        if thread is not None:
            self._thread = None
            self._queue.put(_STOP)
            if wait:
                thread.join(timeout)
