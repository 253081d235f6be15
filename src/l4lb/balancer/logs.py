"""Structured log lines on stderr: one line per event, ``key=value`` after the event name.

Every message in the balancer starts with ``event=NAME`` and goes on with ``key=value`` pairs
(values with spaces are quoted with ``%r``), so ``grep event=connect_failed`` finds them all.

Logging never blocks the event loop: a record is formatted where it is logged and put on a
bounded queue; a writer thread writes the lines to stderr. When stderr does not keep up (a
stalled journal, a pipe nobody reads), new lines are dropped and counted, and the writer says so
once it can write again (``event=log_dropped count=N total=M``); :func:`dropped` is exported as
``l4lb_log_dropped_total``.

A flood of one kind of line (a rejection or a connect failure per connection, under attack or
with a dead backend) is limited as journald's ``RateLimitBurst`` limits it: at most
:data:`BURST` lines per second of one message template at INFO or WARNING, then one
``event=log_suppressed`` line a second with the count. Errors are never suppressed. (The
per-connection facts are all in the access log, one JSON line each, as HAProxy logs them.)
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass

from l4lb.observe import syslog

MAX_QUEUED = 10_000
"""Lines waiting for stderr before new ones are dropped."""
BURST = 100
"""Lines of one message template per second before the rest of that second is suppressed."""
WINDOW = 1.0

_FLUSH = object()
_STOP = object()
_REOPEN = object()
_WAKE = object()
"""A summary became due (the first line of a window suppressed): the writer, asleep without a
timeout while nothing is pending, waits from now on for the window to end."""


@dataclass(frozen=True, slots=True)
class _Events:
    """Where event lines go: ``"stderr"`` or a syslog target, with its facility and tag."""

    target: str = "stderr"
    facility: str = "local0"
    tag: str = "l4lb"


_Line = tuple[int, float, str]
"""A queued line: (logging level, time, the formatted line)."""

_WORKER: int | None = None
"""This process's worker index with ``workers > 1`` (None: a single process, the supervisor)."""


def set_worker(index: int) -> None:
    """In a forked worker: every stderr line (``worker=N`` after the logger) and access-log
    line (``"worker": N``) from now on says which worker wrote it."""
    global _WORKER
    _WORKER = index


def worker_index() -> int | None:
    return _WORKER


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        when += f".{int(record.msecs):03d}Z"
        who = (
            f"logger={record.name}" if _WORKER is None else f"logger={record.name} worker={_WORKER}"
        )
        line = f"{when} level={record.levelname.lower()} {who} {record.getMessage()}"
        if record.exc_info:  # a bug, not a user error: keep the trace on one line's neighbours
            line += "\n" + self.formatException(record.exc_info)
        return line


def _event(template: str) -> str:
    head = template.split(" ", 1)[0]
    return head[6:] if head.startswith("event=") else "?"


class QueuedStderr(logging.Handler):
    """Formats in the caller's thread, writes to ``fd`` from a thread of its own."""

    def __init__(self, fd: int = 2, max_queued: int = MAX_QUEUED) -> None:
        super().__init__()
        self.fd = fd
        self.max_queued = max_queued
        self.dropped = 0
        self._reported = 0
        self._windows: dict[tuple[str, str], tuple[float, int]] = {}
        """(logger, template) -> (window start, lines in it)."""
        self._suppressed: dict[tuple[str, str], int] = {}
        self.events = _Events()
        """Where lines go (set by :func:`events_to`; a forked worker keeps it)."""
        self._syslog: syslog.EventLines | None = None
        """The writer's syslog transport while ``events`` names one."""
        self._using: _Events | None = None
        """The settings ``_syslog`` was made for (the writer's)."""
        self._start()
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        """A worker: its own counts, queue and writer (threads do not survive a fork), and
        its own syslog connection (the parent's socket is closed here, not shared)."""
        self.dropped = self._reported = 0
        self._windows = {}
        self._suppressed = {}
        inherited, self._syslog, self._using = self._syslog, None, None
        if inherited is not None:
            inherited.sender.close()
        self._start()

    def _start(self) -> None:
        self._counts = threading.Lock()
        """Guards ``dropped`` and ``_suppressed`` between callers and the writer. Not the
        handler's own lock: ``logging.shutdown`` holds that one while it calls :meth:`flush`
        and :meth:`close`, and a writer waiting for it made every exit wait 2 s twice."""
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="l4lb-log", daemon=True)
        self._thread.start()

    # -- the caller's side (under the handler's lock) ------------------------------------------

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.ERROR and not self._admit(record):
            return
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._put((record.levelno, record.created, line))

    def _admit(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        start, count = self._windows.get(key, (0.0, 0))
        if now - start >= WINDOW:
            self._windows[key] = (now, 1)
            if len(self._windows) > 4096:  # templates are few; a bound all the same
                self._windows = {key: (now, 1)}
            return True
        if count < BURST:
            self._windows[key] = (start, count + 1)
            return True
        with self._counts:
            first = not self._suppressed
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
        if first:
            self._queue.put(_WAKE)
        return False

    def control(self, item: object) -> None:
        """An order for the writer, queued after the lines before it (never dropped)."""
        self._idle.clear()
        self._queue.put(item)

    def _put(self, line: _Line) -> None:
        if self._queue.qsize() >= self.max_queued:
            with self._counts:
                self.dropped += 1
            return
        self._idle.clear()
        self._queue.put(line)

    # -- the writer thread -------------------------------------------------------------------

    def _summaries(self, failing: bool) -> list[_Line]:
        """``log_suppressed`` and ``log_dropped`` lines due now (called by the writer); no
        ``log_dropped`` while the syslog collector is ``failing`` (it would be lost too)."""
        lines = []
        now = time.time()
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + ".000Z"
        with self._counts:
            suppressed, self._suppressed = self._suppressed, {}
            dropped = self.dropped
        for (name, template), count in suppressed.items():
            lines.append(
                f"{when} level=warning logger={name} event=log_suppressed "
                f"event_name={_event(template)} count={count} window={WINDOW:g}s "
                f"detail='more than {BURST} lines a second of this event'"
            )
        if dropped != self._reported and not failing:
            lines.append(
                f"{when} level=warning logger=l4lb.log event=log_dropped "
                f"count={dropped - self._reported} total={dropped} "
                f"detail='{self.events.target} did not keep up: log lines lost'"
            )
            self._reported = dropped
        return [(logging.WARNING, now, line) for line in lines]

    def _due(self) -> float | None:
        """How long the writer may sleep: until the window ends when a summary is pending
        (suppressed lines, drops not reported yet), else until a line comes (None). An idle
        worker's writer then never wakes, and never takes the GIL from the event loop."""
        with self._counts:
            pending = bool(self._suppressed) or self.dropped != self._reported
        return WINDOW if pending else None

    def _run(self) -> None:
        # a signal sent to the process must reach the main thread: here, one whose action is
        # the default (the supervisor blocks them and waits with sigtimedwait) would kill
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        get = self._queue.get
        self._use(self.events)
        while True:
            try:
                items = [get(timeout=self._due())]
            except queue.Empty:
                items = []
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if items and all(item is _WAKE for item in items):
                continue  # a summary became due: it is written when its window ends
            lines: list[_Line] = []
            for item in items:
                if isinstance(item, tuple):
                    lines.append(item)
                elif isinstance(item, _Events) or item is _REOPEN:  # in order with the lines
                    self._deliver(lines)
                    lines = []
                    self._use(item if isinstance(item, _Events) else None)
            failing = self._syslog is not None and self._syslog.sender.failing
            self._deliver(lines + self._summaries(failing))
            if self._queue.empty():
                self._idle.set()
            if _STOP in items:
                if self._syslog is not None:
                    self._syslog.sender.close()
                return

    def _use(self, events: _Events | None) -> None:
        """Switch to ``events`` (the same settings: reconnect); None: reconnect (SIGUSR2)."""
        current = self._syslog
        if events is None or events == self._using:
            if current is not None:
                current.sender.reopen()
            return
        self._syslog = None
        self._using = events
        if current is not None:
            current.sender.close()
        if syslog.is_target(events.target):
            target = syslog.parse_target(events.target)
            self._syslog = syslog.EventLines(target, events.facility, events.tag, self._report)

    def _report(self, level: int, message: str) -> None:
        """The syslog transport's own news (unreachable, back): on stderr, which works."""
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".000Z"
        who = "logger=l4lb.log" if _WORKER is None else f"logger=l4lb.log worker={_WORKER}"
        name = logging.getLevelName(level).lower()
        self._write(f"{when} level={name} {who} {message}\n".encode("utf-8", "backslashreplace"))

    def _deliver(self, lines: list[_Line]) -> None:
        if not lines:
            return
        events = self._syslog
        if events is None:
            text = "\n".join(line for _, _, line in lines) + "\n"
            self._write(text.encode("utf-8", "backslashreplace"))
            return
        lost = sum(not events.send(*line) for line in lines)
        if lost:
            with self._counts:
                self.dropped += lost

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError:  # stderr closed (EPIPE, EBADF): nobody to tell, count what is lost
            with self._counts:
                self.dropped += bytes(view).count(b"\n")
                self._reported = self.dropped  # a report would be lost the same way

    def close(self) -> None:
        """Write what is queued (waiting at most 2 s) and stop the writer thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(2.0)
        super().close()

    def flush(self, timeout: float = 2.0) -> bool:  # type: ignore[override]
        """Wait (up to ``timeout``) until every queued line was written; whether it was."""
        if self._thread.is_alive():
            self._idle.clear()
            self._queue.put(_FLUSH)
            return self._idle.wait(timeout)
        return self._queue.empty()


_HANDLER: QueuedStderr | None = None


def events_to(target: str, facility: str = "local0", tag: str = "l4lb") -> None:
    """From now on, send the event lines to ``target`` (``"stderr"`` or a syslog target,
    ``[log] events``); the same target again reconnects (a reload). Lines already queued go
    where they were bound for."""
    if _HANDLER is not None:
        events = _Events(target, facility, tag)
        _HANDLER.events = events
        _HANDLER.control(events)


def reopen() -> None:
    """Reconnect the event lines' syslog transport, if they use one (SIGUSR2)."""
    if _HANDLER is not None:
        _HANDLER.control(_REOPEN)


def dropped() -> int:
    """Log lines this process dropped because stderr did not keep up."""
    return _HANDLER.dropped if _HANDLER is not None else 0


def flush(timeout: float = 2.0) -> None:
    """Write out what is queued (bounded: a stalled stderr must not hang an exit)."""
    if _HANDLER is not None:
        _HANDLER.flush(timeout)


def setup_logging(level: int = logging.INFO) -> None:
    """Send ``l4lb.*`` loggers to stderr in the one-line format (idempotent)."""
    global _HANDLER
    root = logging.getLogger("l4lb")
    for handler in root.handlers:
        if getattr(handler, "_l4lb", False):
            return
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # None (closed) or not a file (captured)
        fd = 2
    handler = QueuedStderr(fd)
    handler.setFormatter(_Formatter())
    handler._l4lb = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    _HANDLER = handler
    atexit.register(flush)


class Every:
    """At most one line per ``seconds`` for a repeated condition; counts the ones held back.

    ``due()`` returns None while the condition was reported less than ``seconds`` ago, else the
    number of occurrences held back since the last report (0 the first time).
    """

    __slots__ = ("_held", "_last", "seconds")

    def __init__(self, seconds: float = 10.0) -> None:
        self.seconds = seconds
        self._last = -seconds
        self._held = 0

    def due(self, now: float | None = None) -> int | None:
        now = time.monotonic() if now is None else now
        if now - self._last < self.seconds:
            self._held += 1
            return None
        self._last = now
        held, self._held = self._held, 0
        return held
