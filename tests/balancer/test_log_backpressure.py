"""Logging never blocks the balancer: stderr or stdout pipes nobody reads, floods of one event.

Every rejection used to be an INFO line written synchronously to stderr: once a stalled reader
let the pipe fill (~850 rejections), the event loop froze inside write(2), serving nothing and
deaf to SIGTERM.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

from l4lb.balancer.logs import BURST, WINDOW, QueuedStderr
from tests.balancer.helpers import backend, hello
from tests.support.l4lb import config_text
from tests.support.peers import free_port, stop_process, wait_for

REJECTIONS = 4000


def _rejected(port: int, source: str) -> bool:
    """True once the balancer closed a denied connection (it answered: it is not frozen)."""
    with socket.socket() as s:
        s.settimeout(20)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        try:
            return s.recv(10) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def _served(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(20)
        s.connect(("127.0.0.1", port))
        return s.recv(100).startswith(b"client=")


def _metric(admin: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def _start(tmp_path: Path, access: str, unread: str) -> tuple[subprocess.Popen[bytes], int, int]:
    """l4lb with ``unread`` ("stderr" or "stdout") a pipe that is never read after the start."""
    port, admin = free_port(), free_port()
    be = backend(hello)
    b = be.__enter__()
    text = config_text(
        f"127.0.0.1:{port}",
        [b.address],
        listener={"deny": ["127.0.9.0/24"]},
        access_log=access,
    )
    text += f'\n[admin]\nbind = "127.0.0.1:{admin}"\n'
    path = tmp_path / "l4lb.toml"
    path.write_text(text)
    other = open(tmp_path / "other.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "l4lb", "run", "--config", str(path)],
        cwd=tmp_path,
        stdout=subprocess.PIPE if unread == "stdout" else other,
        stderr=subprocess.PIPE if unread == "stderr" else other,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    proc._l4lb_backend = be  # type: ignore[attr-defined]
    if unread == "stderr":
        assert proc.stderr is not None
        started = b""
        while b"event=started" not in started:  # read up to the start, then never again
            line = proc.stderr.readline()
            assert line, started.decode()
            started += line
    else:
        assert wait_for(lambda: b"event=started" in (tmp_path / "other.log").read_bytes(), 20)
    return proc, port, admin


def _flood_then_check(proc: subprocess.Popen[bytes], port: int) -> None:
    try:
        for i in range(REJECTIONS):
            assert _rejected(port, f"127.0.9.{i % 250 + 1}"), f"frozen after {i} rejections"
        assert _served(port)
        proc.send_signal(15)
        assert proc.wait(30) == 0
    finally:
        stop_process(proc)
        proc._l4lb_backend.__exit__(None, None, None)  # type: ignore[attr-defined]


def test_a_stderr_pipe_nobody_reads_freezes_nothing(tmp_path: Path) -> None:
    proc, port, _ = _start(tmp_path, str(tmp_path / "access.log"), "stderr")
    _flood_then_check(proc, port)
    lines = (tmp_path / "access.log").read_text().splitlines()
    assert sum('"event":"rejected"' in line for line in lines) == REJECTIONS


def test_a_stdout_pipe_nobody_reads_bounds_the_access_log(tmp_path: Path) -> None:
    proc, port, admin = _start(tmp_path, "stdout", "stdout")
    for i in range(1000):
        assert _rejected(port, f"127.0.9.{i % 250 + 1}")
    assert _metric(admin, "l4lb_access_log_dropped_total") == 0  # queued, not lost (yet)
    _flood_then_check(proc, port)


def test_the_log_queue_drops_and_reports_instead_of_blocking() -> None:
    """Errors bypass the flood limit: 20,000 of them into a pipe nobody reads."""
    r, w = os.pipe()
    handler = QueuedStderr(w, max_queued=500)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("l4lb.test_backpressure")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for i in range(20_000):
            logger.error("event=boom n=%d pad=%s", i, "x" * 100)
        assert handler.dropped > 20_000 - 500 - 2000
        got = bytearray()
        reader = threading.Thread(target=lambda: got.extend(_read_until(r, b"event=log_dropped")))
        reader.start()
        reader.join(20)
        assert b"event=log_dropped count=" in got
    finally:
        logger.removeHandler(handler)
        _shut(handler, r, w)


def _shut(handler: QueuedStderr, r: int, w: int) -> None:
    """Stop the writer (draining the pipe it may be blocked on), then close both ends."""
    os.set_blocking(r, True)
    drain = threading.Thread(target=lambda: _read_until(r, b"\0never\0"), daemon=True)
    drain.start()
    handler.close()
    os.close(w)
    drain.join(10)
    os.close(r)


def _read_until(fd: int, marker: bytes) -> bytes:
    out = bytearray()
    while marker not in out:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        out += chunk
    return bytes(out)


def test_a_flood_of_one_event_is_summarised(tmp_path: Path) -> None:
    r, w = os.pipe()
    handler = QueuedStderr(w)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("l4lb.test_flood")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for i in range(1000):
            logger.info("event=rejected n=%d", i)
        logger.info("event=other")
        handler.flush(20)
        os.set_blocking(r, False)
        text = os.read(r, 1 << 20).decode()
        assert "event=other" in text  # another event is not held back by the flood
        rejected = text.count("event=rejected ")
        assert 0 < rejected < 1000
        summaries = [x for x in text.splitlines() if "event=log_suppressed" in x]
        assert all("event_name=rejected" in x for x in summaries)
        assert sum(int(x.split("count=")[1].split()[0]) for x in summaries) == 1000 - rejected
    finally:
        logger.removeHandler(handler)
        _shut(handler, r, w)


def _wakeups(thread: threading.Thread) -> int:
    """How many times ``thread`` has gone to sleep and been woken (voluntary context switches)."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


def test_an_idle_writer_sleeps_until_a_line_comes() -> None:
    """The writer waited with a 1 s timeout even with nothing to do: every worker's second
    thread woke once a second and took the GIL from the event loop. Now it sleeps until a line
    (or a due summary) comes. Failed before: 2 or 3 wake-ups in 2.5 idle seconds."""
    r, w = os.pipe()
    handler = QueuedStderr(w)
    handler.setFormatter(logging.Formatter("%(message)s"))
    try:
        handler.handle(logging.makeLogRecord({"msg": "event=one", "levelno": logging.INFO}))
        assert handler.flush(20)
        assert _read_until(r, b"event=one\n").endswith(b"event=one\n")
        before = _wakeups(handler._thread)
        threading.Event().wait(2.5 * WINDOW)  # the absence of a wake-up takes time to see
        # at most the one sleep the writer may start just after flush() returned; with the
        # old 1 s timeout, at least two more
        assert _wakeups(handler._thread) - before <= 1
        handler.handle(logging.makeLogRecord({"msg": "event=two", "levelno": logging.INFO}))
        assert _read_until(r, b"event=two\n").endswith(b"event=two\n")  # a line still wakes it
    finally:
        _shut(handler, r, w)


def test_a_suppressed_flood_is_summarised_without_another_line_or_a_flush() -> None:
    """The writer sleeps without a timeout while nothing is pending: the first suppressed line
    must wake it so that the summary comes when its window ends, not at the next line."""
    r, w = os.pipe()
    handler = QueuedStderr(w)
    handler.setFormatter(logging.Formatter("%(message)s"))
    try:
        for i in range(BURST + 50):
            record = {"msg": "event=rejected n=%d", "args": (i,), "levelno": logging.INFO}
            handler.handle(logging.makeLogRecord(record))
        got = bytearray()
        reader = threading.Thread(target=lambda: got.extend(_read_until(r, b" window=1s")))
        reader.start()
        reader.join(20)
        text = got.decode()
        summaries = [x for x in text.splitlines() if "event=log_suppressed" in x]
        assert summaries, text
        suppressed = sum(int(x.split("count=")[1].split()[0]) for x in summaries)
        assert text.count("event=rejected ") + suppressed == BURST + 50
    finally:
        _shut(handler, r, w)


def test_flush_and_close_under_the_handlers_lock_finish_at_once(tmp_path: Path) -> None:
    """``logging.shutdown`` (at every exit) holds the handler's lock while it calls flush() and
    close(); the writer took that same lock for its counters, so it stalled until both timed out
    (2 s each): every ``l4lb run`` took 4 s to exit after its last line. Now the writer finishes
    while the lock is held: flush() reports the lines written, close() ends the thread."""
    path = tmp_path / "stderr.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    handler = QueuedStderr(fd)
    handler.setFormatter(logging.Formatter("%(message)s"))
    try:
        handler.handle(logging.makeLogRecord({"msg": "event=one", "levelno": logging.INFO}))
        handler.acquire()  # as logging.shutdown() does
        try:
            assert handler.flush(timeout=20) is True
            handler.handle(logging.makeLogRecord({"msg": "event=two", "levelno": logging.INFO}))
            handler.close()
            assert not handler._thread.is_alive()
        finally:
            handler.release()
    finally:
        handler.close()
        os.close(fd)
    assert path.read_text() == "event=one\nevent=two\n"
