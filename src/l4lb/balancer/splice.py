"""Zero-copy relay: bytes go socket -> pipe -> socket with ``os.splice`` and never enter Python.

For connections whose bytes need no inspection (``relay = "splice"``). Each direction is driven
by ``loop.add_reader``/``add_writer`` on the raw non-blocking sockets and keeps the relay rules of
the stream relay:

- **Half-close**: a FIN from one side becomes ``shutdown(SHUT_WR)`` on the other once everything
  before it has been delivered; the other direction keeps flowing until it ends too.
- **Reset**: an error from either socket resets and closes both at once (reason ``reset``).
- **Backpressure**: a direction splices at most one pipe's worth, then pushes it on; if the
  destination would block, it stops watching the source and watches the destination instead until
  the pipe is empty. Memory is bounded by one pipe per direction, in the kernel.
- **Idle timeout**: one timer per connection, re-armed lazily from the time of the last progress.

Pipes come from a process-wide pool and go back as soon as they are empty, so an idle connection
holds no pipe (HAProxy does the same): four descriptors only while bytes are in flight, not per
connection. A pipe that still holds bytes when its connection dies is closed, never reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import struct
from typing import Protocol

__all__ = ["PIPE_SIZE", "PipePool", "SpliceRelay", "available", "start_splice_relay"]

PIPE_SIZE = 1 << 18
"""Bytes a pipe holds (F_SETPIPE_SZ; the kernel default is 64 KiB): one splice moves up to this."""

_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_splice = getattr(os, "splice", None)
_LINGER_RST = struct.pack("ii", 1, 0)
"""SO_LINGER on, 0 seconds: close() sends a RST instead of a FIN."""


def available() -> bool:
    """True where ``os.splice`` exists (Linux, Python 3.10+)."""
    return _splice is not None


class PipePool:
    """Empty non-blocking pipes, reused across connections; at most ``keep`` are kept spare."""

    __slots__ = ("_free", "keep", "size")

    def __init__(self, keep: int = 64, size: int = PIPE_SIZE) -> None:
        self._free: list[tuple[int, int]] = []
        self.keep = keep
        self.size = size

    def take(self) -> tuple[int, int]:
        if self._free:
            return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # above /proc/sys/fs/pipe-max-size for an unprivileged user: keep the default size
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, _F_SETPIPE_SZ, self.size)
        return r, w

    def give(self, pipe: tuple[int, int]) -> None:
        """Return an *empty* pipe."""
        if len(self._free) < self.keep:
            self._free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def discard(self, pipe: tuple[int, int]) -> None:
        """Close a pipe that may still hold bytes."""
        os.close(pipe[0])
        os.close(pipe[1])

    def clear(self) -> None:
        while self._free:
            self.discard(self._free.pop())


POOL = PipePool()
"""The process's pool (one event loop per worker process)."""


class Connection(Protocol):
    """What the relay reports to: byte counters and one close callback with the end reason."""

    bytes_from_client: int
    bytes_to_client: int

    def relay_closed(self, reason: str) -> None: ...


class _Direction:
    """One way through the relay: ``src`` -> pipe -> ``dst``."""

    __slots__ = ("dst", "dst_fd", "eof", "pending", "pipe", "relay", "src", "src_fd", "to_client")

    def __init__(
        self, relay: SpliceRelay, src: socket.socket, dst: socket.socket, to_client: bool
    ) -> None:
        self.relay = relay
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.to_client = to_client
        self.pipe: tuple[int, int] | None = None
        self.pending = 0
        """Bytes in the pipe not yet delivered; while > 0 the source is not watched."""
        self.eof = False

    def readable(self) -> None:
        if self.relay.closed:
            return
        pipe = self.pipe
        if pipe is None:
            pipe = self.pipe = self.relay.pool.take()
        try:
            n = _splice(self.src_fd, pipe[1], PIPE_SIZE, flags=_FLAGS)  # type: ignore[misc]
        except BlockingIOError:
            return
        except OSError as err:
            self.relay.failed(err)
            return
        if n == 0:
            self._ended()
            return
        self.pending = n
        self._push(True)

    def writable(self) -> None:
        if not self.relay.closed:
            self._push(False)

    def _push(self, watching_src: bool) -> None:
        """Move the pipe's bytes to ``dst``; swap which socket is watched when it would block."""
        pipe = self.pipe
        assert pipe is not None
        relay = self.relay
        try:
            m = _splice(pipe[0], self.dst_fd, self.pending, flags=_FLAGS)  # type: ignore[misc]
        except BlockingIOError:
            m = 0
        except OSError as err:
            relay.failed(err)
            return
        if m:
            self.pending -= m
            relay.progress(m, self.to_client)
        loop = relay.loop
        if self.pending:
            if watching_src:
                loop.remove_reader(self.src_fd)
                loop.add_writer(self.dst_fd, self.writable)
            return
        self.pipe = None
        relay.pool.give(pipe)
        if not watching_src:
            loop.remove_writer(self.dst_fd)
            if self.eof:
                self._shutdown_dst()
            else:
                loop.add_reader(self.src_fd, self.readable)

    def _ended(self) -> None:
        """``src`` sent FIN (the pipe is empty: we only read into an empty pipe)."""
        relay = self.relay
        relay.loop.remove_reader(self.src_fd)
        if self.pipe is not None:
            relay.pool.give(self.pipe)
            self.pipe = None
        self.eof = True
        self._shutdown_dst()

    def _shutdown_dst(self) -> None:
        # if the other side is already gone, its own read or write will say so
        with contextlib.suppress(OSError):
            self.dst.shutdown(socket.SHUT_WR)
        self.relay.half_closed(self.to_client)

    def stop(self) -> None:
        loop = self.relay.loop
        loop.remove_reader(self.src_fd)
        loop.remove_writer(self.dst_fd)
        if self.pipe is not None:
            if self.pending:
                self.relay.pool.discard(self.pipe)
            else:
                self.relay.pool.give(self.pipe)
            self.pipe = None


class SpliceRelay:
    """Relays one connection between ``client`` and ``backend`` with ``os.splice``.

    Owns both sockets from :meth:`start` on and closes them when both directions have ended, on
    any socket error, on the idle timeout, or on :meth:`close`; then calls
    ``conn.relay_closed(reason)`` exactly once.
    """

    __slots__ = (
        "backend",
        "client",
        "closed",
        "conn",
        "first_reason",
        "idle_timeout",
        "last",
        "loop",
        "pool",
        "timer",
        "to_backend",
        "to_client",
        "unsent",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        backend: socket.socket,
        conn: Connection,
        idle_timeout: float | None = None,
        pool: PipePool = POOL,
    ) -> None:
        self.loop = loop
        self.client = client
        self.backend = backend
        self.conn = conn
        self.pool = pool
        self.idle_timeout = idle_timeout
        self.to_backend = _Direction(self, client, backend, to_client=False)
        self.to_client = _Direction(self, backend, client, to_client=True)
        self.unsent = b""
        self.first_reason: str | None = None
        self.closed = False
        self.last = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def start(self, first: bytes = b"") -> None:
        """Send ``first`` (PROXY header + early client bytes) in one write, then relay."""
        loop = self.loop
        if first:
            try:
                sent = self.backend.send(first)
            except BlockingIOError:
                sent = 0
            except OSError as err:
                self.failed(err)
                return
            if sent < len(first):
                self.unsent = first[sent:]
                loop.add_writer(self.backend.fileno(), self._send_first)
        if not self.unsent:
            loop.add_reader(self.client.fileno(), self.to_backend.readable)
        loop.add_reader(self.backend.fileno(), self.to_client.readable)
        if self.idle_timeout:
            self.last = loop.time()
            self.timer = loop.call_at(self.last + self.idle_timeout, self._check_idle)

    def _send_first(self) -> None:
        try:
            sent = self.backend.send(self.unsent)
        except BlockingIOError:
            return
        except OSError as err:
            self.failed(err)
            return
        self.unsent = self.unsent[sent:]
        if not self.unsent:
            self.loop.remove_writer(self.backend.fileno())
            self.loop.add_reader(self.client.fileno(), self.to_backend.readable)

    def progress(self, n: int, to_client: bool) -> None:
        if to_client:
            self.conn.bytes_to_client += n
        else:
            self.conn.bytes_from_client += n
        if self.timer is not None:
            self.last = self.loop.time()

    def half_closed(self, to_client: bool) -> None:
        """One direction has ended with a FIN; close when both have."""
        if self.first_reason is None:
            self.first_reason = "backend_closed" if to_client else "client_closed"
        if self.to_backend.eof and self.to_client.eof:
            self.close(self.first_reason)

    def failed(self, err: OSError) -> None:
        """A socket error (reset, broken pipe): close both sides now."""
        # like the stream relay: the other side is reset too, not given a clean FIN
        for sock in (self.client, self.backend):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        if err.errno in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT):
            self.close("reset")
        else:
            self.close("error")

    def _check_idle(self) -> None:
        assert self.idle_timeout is not None
        due = self.last + self.idle_timeout
        if self.loop.time() >= due:
            self.timer = None
            self.close("idle_timeout")
        else:
            self.timer = self.loop.call_at(due, self._check_idle)

    def close(self, reason: str) -> None:
        """Stop relaying, close both sockets, report ``reason`` (once)."""
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.unsent:
            self.loop.remove_writer(self.backend.fileno())
            self.unsent = b""
        self.to_backend.stop()
        self.to_client.stop()
        self.client.close()
        self.backend.close()
        self.conn.relay_closed(reason)


def start_splice_relay(
    loop: asyncio.AbstractEventLoop,
    client_sock: socket.socket,
    backend_sock: socket.socket,
    first: bytes,
    conn: Connection,
    idle_timeout: float | None = None,
) -> SpliceRelay:
    """Relay ``client_sock`` <-> ``backend_sock`` by splice; same shape as the stream relay."""
    client_sock.setblocking(False)
    backend_sock.setblocking(False)
    relay = SpliceRelay(loop, client_sock, backend_sock, conn, idle_timeout)
    relay.start(first)
    return relay
