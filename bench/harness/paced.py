"""Open-loop paced client: new connections at a fixed rate, latency of each, as JSON on stdout.

wrk2 is not packaged here and plain wrk is closed-loop (it waits for a response before sending the
next request, so a slow server lowers its own load and hides queueing). This client starts one
``GET /tiny`` on a new connection every 1/rate seconds whatever happened before, and measures each
from its *scheduled* start to the end of the response, so a stall counts against every request it
delays (no coordinated omission). Run it pinned to the generator core:

    python bench/harness/paced.py --port 8080 --rate 1000 --duration 5

The generator's own delays count against every contender alike, so it is kept as small as a
Python process allows: one ``epoll`` set and no event-loop framework (no Task, no coroutine, no
timer object per connection; about seven system calls each), and the schedule comes from a
periodic ``timerfd`` (nanosecond expiries, where ``epoll_wait``'s and uvloop's timeouts round to
whole milliseconds). ``lag_*`` in the output is how late each connection's ``connect()`` was
made against its schedule: what the generator itself adds to every latency.

``p50_ms``/``p99_ms`` (the figures) count from the schedule. ``*_from_connect_ms`` count the same
requests from their actual ``connect()``: each request's own lag taken out, request by request
(a percentile of differences, not a difference of percentiles): how much of a tail was the
generator starting late. It still includes the generator's lateness in reading the answer.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import select
import socket
import struct
import time
from dataclasses import dataclass

REQUEST = b"GET /tiny HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"

_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC
_TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _timespec(seconds: float) -> _Timespec:
    ns = round(seconds * 1e9)
    return _Timespec(ns // 1_000_000_000, ns % 1_000_000_000)


def periodic_timer(first: float, interval: float) -> int:
    """A non-blocking timerfd on CLOCK_MONOTONIC expiring at ``first``, then every ``interval``.

    Reading it gives the number of expiries since the last read (8 bytes, native order).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.timerfd_create(time.CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "timerfd_create")
    spec = _Itimerspec(_timespec(interval), _timespec(first))
    if libc.timerfd_settime(fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None) < 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, "timerfd_settime")
    return fd


@dataclass(slots=True)
class _Conn:
    sock: socket.socket
    scheduled: float
    connected: float
    """When ``connect()`` was called (the schedule plus the generator's own lag)."""
    sent: bool = False
    got: int = 0
    first: float = 0.0
    """When the answer's first byte was read (0 until then)."""


def run(
    port: int, rate: float, duration: float, timeout: float, raw: str | None = None
) -> dict[str, object]:
    """Pace ``rate`` new connections/s for ``duration`` s; the summary as a dict. ``raw``: also
    write every request's times, one JSON line each (see :func:`main`)."""
    n = int(rate * duration)
    interval = 1.0 / rate
    addr = ("127.0.0.1", port)
    clock = time.monotonic  # CLOCK_MONOTONIC, the timerfd's clock
    start = clock() + 0.01
    ep = select.epoll()
    timer = periodic_timer(start, interval)
    ep.register(timer, select.EPOLLIN)
    inflight: dict[int, _Conn] = {}
    latencies: list[float] = []
    from_connect: list[float] = []
    lags: list[float] = []
    rows: list[tuple[float, float, float, float]] = []
    """(scheduled, connect, first byte, end) of each answered request, with ``raw``."""
    errors = 0
    started = 0
    watch = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
    next_sweep = start + 0.1

    def finish(fd: int, c: _Conn, ok: bool) -> None:
        nonlocal errors
        del inflight[fd]
        c.sock.close()  # also leaves the epoll set
        if ok and c.got:
            now = clock()
            latencies.append(now - c.scheduled)
            from_connect.append(now - c.connected)
            if raw is not None:
                rows.append((c.scheduled, c.connected, c.first, now))
        else:
            errors += 1

    try:
        while started < n or inflight:
            for fd, ev in ep.poll(0.1):
                if fd == timer:
                    try:
                        due = struct.unpack("=Q", os.read(timer, 8))[0]
                    except BlockingIOError:
                        continue
                    for _ in range(min(due, n - started)):
                        scheduled = start + started * interval
                        started += 1
                        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                        s.setblocking(False)
                        now = clock()
                        lags.append(now - scheduled)
                        if s.connect_ex(addr) not in (0, errno.EINPROGRESS):
                            s.close()
                            errors += 1
                            continue
                        inflight[s.fileno()] = _Conn(s, scheduled, now)
                        ep.register(s.fileno(), watch)
                    if started >= n:
                        ep.unregister(timer)
                    continue
                c = inflight.get(fd)
                if c is None:
                    continue
                if ev & select.EPOLLERR:
                    finish(fd, c, False)
                    continue
                if not c.sent and ev & select.EPOLLOUT:
                    try:
                        sent = c.sock.send(REQUEST)
                    except OSError:
                        finish(fd, c, False)
                        continue
                    if sent != len(REQUEST):  # 58 bytes on a fresh loopback socket: never
                        finish(fd, c, False)
                        continue
                    c.sent = True
                if c.sent and ev & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP):
                    while True:  # edge-triggered: read until EAGAIN or the end
                        try:
                            chunk = c.sock.recv(4096)
                        except BlockingIOError:
                            break
                        except OSError:
                            finish(fd, c, False)
                            break
                        if not chunk:
                            finish(fd, c, True)
                            break
                        if not c.got:
                            c.first = clock()
                        c.got += len(chunk)
            now = clock()
            if now >= next_sweep:
                next_sweep = now + 0.1
                for fd, c in list(inflight.items()):
                    if now - c.scheduled > timeout:
                        finish(fd, c, False)
    finally:
        for c in inflight.values():
            c.sock.close()
        os.close(timer)
        ep.close()
    wall = clock() - start

    def pct(values: list[float], p: float) -> float | None:
        if not values:
            return None
        return round(values[min(len(values) - 1, int(p * len(values)))] * 1000, 3)

    if raw is not None:
        with open(raw, "w") as f:
            for row in rows:
                f.write(json.dumps([round((t - start) * 1e6, 1) for t in row]) + "\n")
    latencies.sort()
    from_connect.sort()
    lags.sort()
    return {
        "requests": n,
        "ok": len(latencies),
        "errors": errors,
        "wall_s": round(wall, 3),
        "rate": rate,
        "p50_ms": pct(latencies, 0.50),
        "p90_ms": pct(latencies, 0.90),
        "p99_ms": pct(latencies, 0.99),
        "p999_ms": pct(latencies, 0.999),
        "max_ms": round(latencies[-1] * 1000, 3) if latencies else None,
        "p50_from_connect_ms": pct(from_connect, 0.50),
        "p99_from_connect_ms": pct(from_connect, 0.99),
        "lag_p50_ms": pct(lags, 0.50),
        "lag_p99_ms": pct(lags, 0.99),
        "lag_max_ms": round(lags[-1] * 1000, 3) if lags else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--duration", type=float, default=5)
    ap.add_argument("--timeout", type=float, default=5)
    ap.add_argument(
        "--raw",
        help="write each answered request's scheduled, connect(), first-byte and end times "
        "(microseconds from the start, one JSON list a line) to this file",
    )
    args = ap.parse_args()
    print(json.dumps(run(args.port, args.rate, args.duration, args.timeout, args.raw)))


if __name__ == "__main__":
    main()
