"""Zero-copy relay: bytes go socket -> pipe -> socket with ``os.splice`` and never enter Python.

For connections whose bytes need no inspection (``relay = "splice"``). It keeps the relay rules
of the stream relay:

- **Half-close**: a FIN from one side becomes ``shutdown(SHUT_WR)`` on the other once everything
  before it has been delivered; the other direction keeps flowing until it ends too.
- **Reset**: an error from either socket resets and closes both at once (reason ``reset``).
- **Backpressure**: a direction splices at most one pipe's worth, then pushes it on; while the
  destination would block it reads nothing more, so memory is bounded by one pipe per direction,
  in the kernel.
- **Idle timeout**: one timer per connection, re-armed lazily from the time of the last progress.

Pipes come from a process-wide pool and go back as soon as they are empty, so an idle connection
holds no pipe (HAProxy does the same): four descriptors only while bytes are in flight, not per
connection. A pipe that still holds bytes when its connection dies is closed, never reused.

Small messages do not pay for the pipe: each direction starts by copying through one 64 KiB
buffer per event loop (``recv_into`` + ``send``, nothing kept unless the destination is full) and
switches to splice for good on its first full read, as HAProxy's ``splice-auto`` does.

Readiness comes from one edge-triggered epoll set per event loop (:class:`_Poller`), itself
watched by the loop with a single ``add_reader``. Each socket is added once, for input and output,
and never modified: an edge-triggered direction simply moves bytes until the kernel says
``EAGAIN``, and closing a socket removes it from the set. This costs two ``epoll_ctl`` calls per
connection, where ``add_reader``/``remove_reader`` on uvloop cost about five system calls per
change (libuv's checks, ``FIONBIO`` and io_uring submissions), measured with ``strace -c``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import select
import socket
import struct
import weakref
from collections.abc import Callable
from typing import Protocol

__all__ = [
    "PIPE_SIZE",
    "PipePool",
    "SpliceRelay",
    "available",
    "start_splice_relay",
    "stop_waiting",
    "wait_connected",
]

PIPE_SIZE = 1 << 20
"""Bytes a pipe holds (F_SETPIPE_SZ; the kernel default is 64 KiB): one splice moves up to this."""

COPY_SIZE = 1 << 16
"""A read of this many bytes marks a direction as bulk: it is spliced from then on."""

_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_splice = getattr(os, "splice", None)
_HAVE_EPOLL = hasattr(select, "epoll")
_LINGER_RST = struct.pack("ii", 1, 0)
# Linux's values, spelled out so the module imports anywhere (``available()`` says if it runs)
_EPOLLIN, _EPOLLOUT, _EPOLLERR, _EPOLLHUP, _EPOLLRDHUP, _EPOLLET = (
    0x1,
    0x4,
    0x8,
    0x10,
    0x2000,
    1 << 31,
)
_EVENTS = _EPOLLIN | _EPOLLOUT | _EPOLLRDHUP | _EPOLLET
_IN = _EPOLLIN | _EPOLLRDHUP | _EPOLLHUP
_OUT = _EPOLLOUT | _EPOLLHUP
_ERR = _EPOLLERR
_HUP = _EPOLLRDHUP | _EPOLLHUP | _EPOLLERR
_BUDGET = 16
"""Pipes' worth one direction moves per wake-up before letting other connections run."""
"""SO_LINGER on, 0 seconds: close() sends a RST instead of a FIN."""


def available() -> bool:
    """True where ``os.splice`` and epoll exist (Linux, Python 3.10+)."""
    return _splice is not None and _HAVE_EPOLL


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


class _Handler(Protocol):
    def event(self, fd: int, events: int) -> None: ...


class _Poller:
    """One edge-triggered epoll set for every splice relay of an event loop."""

    __slots__ = ("__weakref__", "buf", "ep", "fds", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.buf = memoryview(bytearray(COPY_SIZE))
        """The copy buffer of every relay on this loop: filled and sent within one callback."""
        self.ep = select.epoll()
        self.fds: dict[int, _Handler] = {}
        loop.add_reader(self.ep.fileno(), self._dispatch)

    def register(self, sock: socket.socket, fd: int, handler: _Handler) -> None:
        """Send ``sock``'s events to ``handler``; no system call if it is already in the set."""
        current = self.fds.get(fd)
        self.fds[fd] = handler
        if isinstance(current, _Connecting) and current.sock() is sock:
            return  # added while it connected; still in the set (closing is what removes it)
        try:
            self.ep.register(fd, _EVENTS)
        except FileExistsError:  # a socket we stopped watching but that was never closed
            self.ep.modify(fd, _EVENTS)

    def _dispatch(self) -> None:
        fds = self.fds
        for fd, events in self.ep.poll(0):
            handler = fds.get(fd)
            if handler is not None:
                handler.event(fd, events)


class _Connecting:
    """Waits for one non-blocking ``connect()`` to finish, then stays as a marker.

    The marker lets a splice relay take the socket over without another ``epoll_ctl``; for any
    other use, the socket's first later event removes it from the set (one ``epoll_ctl``).
    """

    __slots__ = ("callback", "poller", "sock")

    def __init__(
        self, poller: _Poller, sock: socket.socket, callback: Callable[[], object] | None
    ) -> None:
        self.poller = poller
        self.sock = weakref.ref(sock)
        self.callback = callback

    def event(self, fd: int, events: int) -> None:
        callback = self.callback
        if callback is None:  # connected and handed to something else: leave the set
            self.poller.fds.pop(fd, None)
            with contextlib.suppress(OSError):
                self.poller.ep.unregister(fd)
            return
        if events & (_EPOLLOUT | _ERR | _EPOLLHUP):
            self.callback = None
            callback()


def wait_connected(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, callback: Callable[[], object]
) -> None:
    """Call ``callback`` once when the connecting ``sock`` is writable (connected or failed).

    A cheaper ``loop.add_writer`` for the backend connect (one ``epoll_ctl`` instead of about
    eight system calls on uvloop, and none more if a splice relay then takes the socket). Call
    :func:`stop_waiting` if the wait is abandoned (timeout, shutdown) before closing the socket.
    """
    fd = sock.fileno()
    if not _HAVE_EPOLL:  # elsewhere: the loop's own one-shot writer watch

        def once() -> None:
            loop.remove_writer(fd)
            callback()

        loop.add_writer(fd, once)
        return
    poller = _poller(loop)
    poller.fds[fd] = _Connecting(poller, sock, callback)
    try:
        poller.ep.register(fd, _EVENTS)
    except FileExistsError:
        poller.ep.modify(fd, _EVENTS)


def stop_waiting(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Forget a :func:`wait_connected` that will not be needed (the caller closes ``sock``)."""
    if not _HAVE_EPOLL:
        loop.remove_writer(sock.fileno())
        return
    poller = _POLLERS.get(loop)
    if poller is not None:
        current = poller.fds.get(sock.fileno())
        if isinstance(current, _Connecting) and current.sock() is sock:
            current.callback = None


_POLLERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Poller] = (
    weakref.WeakKeyDictionary()
)


def _poller(loop: asyncio.AbstractEventLoop) -> _Poller:
    poller = _POLLERS.get(loop)
    if poller is None:
        poller = _POLLERS[loop] = _Poller(loop)
    return poller


class _Direction:
    """One way through the relay: ``src`` -> pipe -> ``dst``."""

    __slots__ = (
        "copy",
        "dst",
        "dst_fd",
        "eof",
        "head",
        "head_counts",
        "pending",
        "pipe",
        "relay",
        "src",
        "src_fd",
        "to_client",
    )

    def __init__(
        self, relay: SpliceRelay, src: socket.socket, dst: socket.socket, to_client: bool
    ) -> None:
        self.relay = relay
        self.src = src
        self.src_fd = src.fileno()
        self.dst = dst
        self.dst_fd = dst.fileno()
        self.to_client = to_client
        self.copy = True
        """Small messages are copied (recv/send); the first full read switches to splice."""
        self.head = b""
        """Bytes to send before anything else: the PROXY header, or a copy's unsent rest."""
        self.head_counts = False
        """Whether ``head`` is relayed data (counted when sent) rather than our header."""
        self.pipe: tuple[int, int] | None = None
        self.pending = 0
        """Bytes in the pipe not yet delivered; while > 0 nothing more is read from ``src``."""
        self.eof = False

    def pump(self, short_ok: bool = False) -> None:
        """Move bytes until the source is drained, the destination is full, or the budget ends.

        Edge-triggered: stopping early without ``EAGAIN`` would wait for an edge that may never
        come, so the budget's end schedules the rest with ``call_soon``. ``short_ok``: the wake-up
        was a plain EPOLLIN (no FIN seen), so a short ``recv`` proves the socket drained (TCP
        copies all it has) and the ``EAGAIN`` probe can be skipped; any later byte is a new edge.
        """
        relay = self.relay
        if self.head and not self._send_head():
            return
        budget = _BUDGET
        while True:
            pipe = self.pipe
            if self.pending:
                assert pipe is not None
                try:
                    m = _splice(pipe[0], self.dst_fd, self.pending, flags=_FLAGS)  # type: ignore[misc]
                except BlockingIOError:
                    return  # the destination's EPOLLOUT edge resumes us
                except OSError as err:
                    relay.failed(err)
                    return
                self.pending -= m
                relay.progress(m, self.to_client)
                continue
            if self.eof:
                return
            budget -= 1
            if budget < 0:
                relay.loop.call_soon(self.resume)
                return
            if self.copy:
                if not self._copy(short_ok):
                    return
                continue
            if pipe is None:
                pipe = self.pipe = relay.pool.take()
            try:
                n = _splice(self.src_fd, pipe[1], relay.pool.size, flags=_FLAGS)  # type: ignore[misc]
            except BlockingIOError:
                self.pipe = None
                relay.pool.give(pipe)
                return
            except OSError as err:
                relay.failed(err)
                return
            if n == 0:
                self.pipe = None
                relay.pool.give(pipe)
                self._ended()
                return
            self.pending = n

    def _copy(self, short_ok: bool) -> bool:
        """Relay one read through the loop's shared buffer; False when this wake-up is over.

        For small messages recv/send costs less than splice's two pipe operations (measured:
        keep-alive requests). A read that fills the buffer means bulk: splice from then on.
        What the destination does not take at once is kept as ``head`` (at most one buffer).
        """
        relay = self.relay
        buf = relay.poller.buf
        try:
            n = self.src.recv_into(buf)
        except BlockingIOError:
            return False
        except OSError as err:
            relay.failed(err)
            return False
        if n == 0:
            self._ended()
            return False
        if n == len(buf):
            self.copy = False
        try:
            sent = self.dst.send(buf[:n])
        except BlockingIOError:
            sent = 0
        except OSError as err:
            relay.failed(err)
            return False
        if sent:
            relay.progress(sent, self.to_client)
        if sent < n:
            self.head = bytes(buf[sent:n])
            self.head_counts = True
            return False  # the destination's EPOLLOUT edge resumes us
        return not short_ok or n == len(buf)

    def resume(self) -> None:
        if not self.relay.closed:
            self.pump()

    def _send_head(self) -> bool:
        """Send what is left of ``head``; True once all of it is out."""
        try:
            sent = self.dst.send(self.head)
        except BlockingIOError:
            return False
        except OSError as err:
            self.relay.failed(err)
            return False
        self.head = self.head[sent:]
        if self.head_counts and sent:
            self.relay.progress(sent, self.to_client)
        return not self.head

    def _ended(self) -> None:
        """``src`` sent FIN and everything before it is delivered: pass the FIN on."""
        self.eof = True
        relay = self.relay
        other = relay.to_backend if self.to_client else relay.to_client
        if not other.eof:
            # if the other side is already gone, its own read or write will say so
            with contextlib.suppress(OSError):
                self.dst.shutdown(socket.SHUT_WR)
        # else both ways are done: the close that follows sends this FIN (one syscall fewer)
        relay.half_closed(self.to_client)

    def stop(self) -> None:
        if self.pipe is not None:
            if self.pending:
                self.relay.pool.discard(self.pipe)
            else:
                self.relay.pool.give(self.pipe)
            self.pipe = None
            self.pending = 0


class SpliceRelay:
    """Relays one connection between ``client`` and ``backend`` with ``os.splice``.

    Owns both sockets from :meth:`start` on and closes them when both directions have ended, on
    any socket error, on the idle timeout, or on :meth:`close`; then calls
    ``conn.relay_closed(reason)`` exactly once.
    """

    __slots__ = (
        "backend",
        "client",
        "client_fd",
        "closed",
        "conn",
        "first_reason",
        "idle_timeout",
        "last",
        "loop",
        "poller",
        "pool",
        "timer",
        "to_backend",
        "to_client",
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
        self.client_fd = client.fileno()
        self.conn = conn
        self.pool = pool
        self.poller = _poller(loop)
        self.idle_timeout = idle_timeout
        self.to_backend = _Direction(self, client, backend, to_client=False)
        self.to_client = _Direction(self, backend, client, to_client=True)
        self.first_reason: str | None = None
        self.closed = False
        self.last = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def start(self, first: bytes = b"") -> None:
        """Send ``first`` (PROXY header + early client bytes) in one write, then relay.

        Whatever the client has already sent rides in the same write, right after the header
        (as HAProxy does): one ``send`` and one wake-up fewer for the usual client that speaks
        first, one ``EAGAIN`` for one that waits for the server.
        """
        if first:
            self._send_first(first)
            if self.closed:
                return
        poller = self.poller
        # registering reports what is already pending (edge-triggered sets start "ready")
        poller.register(self.client, self.client_fd, self)
        poller.register(self.backend, self.to_client.src_fd, self)
        if self.idle_timeout:
            self.last = self.loop.time()
            self.timer = self.loop.call_at(self.last + self.idle_timeout, self._check_idle)

    def _send_first(self, first: bytes) -> None:
        buf = self.poller.buf
        size = len(first)
        n = 0
        reset: OSError | None = None
        if size < len(buf) // 2:
            buf[:size] = first
            try:
                n = self.client.recv_into(buf[size:])
            except BlockingIOError:
                n = 0
            except OSError as err:
                # the client is gone (e.g. a health check that resets at once): the header
                # and what came before the reset still go to the backend, then both close
                reset = err
            # n == 0 at EOF too: the registration below reports it again
            if n:
                self.conn.bytes_from_client += n
                if size + n == len(buf):
                    self.to_backend.copy = False  # a full read: bulk
        out = buf[: size + n] if n else first
        try:
            sent = self.backend.send(out)
        except BlockingIOError:
            sent = 0
        except OSError as err:
            self.failed(err)
            return
        if reset is not None:
            self.failed(reset)
            return
        if sent < len(out):
            self.to_backend.head = bytes(out[sent:])

    def event(self, fd: int, events: int) -> None:
        """Readiness of one of our sockets, from the poller."""
        if self.closed:
            return
        if fd == self.client_fd:
            reader, writer = self.to_backend, self.to_client
        else:
            reader, writer = self.to_client, self.to_backend
        if events & _ERR:
            # a reset: deliver what arrived before it (the read then meets the error itself)
            if not reader.pending and not reader.eof:
                reader.pump()
            if not self.closed:
                sock = self.client if fd == self.client_fd else self.backend
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.ECONNRESET
                self.failed(OSError(code, os.strerror(code)))
            return
        if events & _OUT and (writer.pending or writer.head):
            writer.pump()
            if self.closed:
                return
        if events & _IN and not reader.pending and not reader.head:
            reader.pump(not events & _HUP)

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
        """A socket error (reset, broken pipe): reset and close both sides now."""
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
        fds = self.poller.fds
        fds.pop(self.client_fd, None)
        fds.pop(self.to_client.src_fd, None)
        self.to_backend.stop()
        self.to_client.stop()
        # closing removes them from the epoll set
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
    """Relay ``client_sock`` <-> ``backend_sock`` by splice; same shape as the stream relay.

    Edge-triggered reads go on until ``EAGAIN``, so both sockets must be non-blocking; the
    listener and the connector already make them so, which ``gettimeout()`` tells without a
    system call.
    """
    for sock in (client_sock, backend_sock):
        if sock.gettimeout() != 0.0:
            sock.setblocking(False)
    relay = SpliceRelay(loop, client_sock, backend_sock, conn, idle_timeout)
    relay.start(first)
    return relay
