"""Zero-copy relay: bytes go socket -> pipe -> socket with ``os.splice`` and never enter Python.

One implementation of :mod:`l4lb.balancer.relay_contract` (``relay = "splice"``, the default: it
costs fewer system calls and less CPU per connection than the stream relay). Its rules:

- **Half-close**: a FIN from one side becomes ``shutdown(SHUT_WR)`` on the other once everything
  before it has been delivered; the other direction keeps flowing until it ends too.
- **Reset**: an error from either socket resets and closes both at once (reason ``reset``).
- **Backpressure**: a direction splices at most one pipe's worth, then pushes it on; while the
  destination would block it reads nothing more, so memory is bounded by one pipe per direction,
  in the kernel.
- **Idle timeout**: not here; the runtime's sweep closes connections whose counters stand still.

Pipes come from a process-wide pool and go back as soon as they are empty, so an idle connection
holds no pipe (HAProxy does the same): four descriptors only while bytes are in flight, not per
connection. A pipe that still holds bytes when its connection dies is closed, never reused. When
no pipe can be made (out of descriptors), that direction copies through userspace instead
(``event=pipe_unavailable``). The pool makes a pipe only when none is free, so there are never
more pipes than directions busy at once: ``l4lb run`` raises its descriptor limit towards two
sockets and two pipes a connection, and needs only the sockets to fit (``command.FdBudget``).

Small messages do not pay for the pipe: each direction starts by copying through one 64 KiB
buffer per event loop (``recv_into`` + ``send``, nothing kept unless the destination is full) and
switches to splice for good on its first full read, as HAProxy's ``splice-auto`` does.

Readiness comes from the loop's :class:`~l4lb.balancer.poller.Poller` (edge-triggered, each socket
added once; a backend socket is taken over from its connect watch without a system call). The
client socket is added for input only; its output edges are asked for the first time a write to
it would block (:meth:`_Direction.wait_writable`), so the ACKs of a short answer wake nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import time
from typing import Final

from l4lb.balancer import poller
from l4lb.balancer.poller import (
    EDGE_EVENTS,
    EPOLLERR,
    EPOLLHUP,
    EPOLLIN,
    EPOLLOUT,
    EPOLLRDHUP,
    INPUT_EVENTS,
    SCRATCH_ROOM,
)
from l4lb.balancer.relay_contract import (
    EndReason,
    NativeConn,
    RelayConn,
    Socket,
    error_reason,
    reset_socket,
)

__all__ = [
    "PIPE_SIZE",
    "PipePool",
    "SpliceRelay",
    "available",
    "start_nonblocking",
    "start_splice_relay",
]

log = logging.getLogger("l4lb.relay")

PIPE_SIZE: Final = 1 << 20
"""Bytes a pipe holds (F_SETPIPE_SZ; the kernel default is 64 KiB): one splice moves up to this."""

COPY_SIZE: Final = 1 << 16
"""A read of this many bytes marks a direction as bulk: it is spliced from then on."""

# ``Final`` module constants: compiled, a plain module name is a dict look-up on every read
# (about 140 instructions; ten per event before these), a ``Final`` one a C static or a literal
_F_SETPIPE_SZ: Final[int] = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_FLAGS: Final[int] = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_splice: Final = getattr(os, "splice", None)
_IN: Final = EPOLLIN | EPOLLRDHUP | EPOLLHUP
_OUT: Final = EPOLLOUT | EPOLLHUP
_ERR: Final = EPOLLERR
_HUP: Final = EPOLLRDHUP | EPOLLHUP | EPOLLERR
_SHUT_WR: Final = int(socket.SHUT_WR)
_ONE_SEGMENT: Final = 536
"""The largest first write sent without TCP_NODELAY: one segment under any MSS (RFC 9293's
default 536), so Nagle's algorithm cannot hold any of it back."""
_BUDGET: Final = 16
"""Pipes' worth one direction moves per wake-up before letting other connections run."""
# EndReason members as constants: on Python 3.11 ``EndReason.X`` goes through EnumType's slow
# __getattr__ path (about 1,400 instructions a read; see connection.py)
_BACKEND_CLOSED: Final = EndReason.BACKEND_CLOSED
_CLIENT_CLOSED: Final = EndReason.CLIENT_CLOSED


def available() -> bool:
    """True where ``os.splice`` and epoll exist (Linux, Python 3.10+)."""
    return _splice is not None and poller.available()


class PipePool:
    """Empty non-blocking pipes, reused across connections; at most ``keep`` are kept spare."""

    __slots__ = ("_free", "_quiet_until", "failures", "keep", "size")

    def __init__(self, keep: int = 64, size: int = PIPE_SIZE) -> None:
        self._free: list[tuple[int, int]] = []
        self.keep = keep
        self.size = size
        self.failures = 0
        """Pipes that could not be made (out of descriptors): those reads were copied."""
        self._quiet_until = 0.0

    def take(self) -> tuple[int, int]:
        if self._free:
            return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # above /proc/sys/fs/pipe-max-size for an unprivileged user: keep the default size
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, _F_SETPIPE_SZ, self.size)
        return r, w

    def unavailable(self, err: OSError) -> None:
        """Count a failed :meth:`take`; say so at most every 10 s (it can come in floods)."""
        self.failures += 1
        now = time.monotonic()
        if now >= self._quiet_until:
            self._quiet_until = now + 10.0
            log.warning(
                "event=pipe_unavailable error=%r failures=%d detail='no descriptor for a splice "
                "pipe: copying through userspace until descriptors free up (raise the "
                "descriptor limit or lower max_conns)'",
                err.strerror,
                self.failures,
            )

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


class _Direction:
    """One way through the relay: ``src`` -> pipe -> ``dst``."""

    __slots__ = (
        "copy",
        "dst",
        "dst_fd",
        "eof",
        "head",
        "head_counts",
        "nagle",
        "out_watched",
        "pending",
        "pipe",
        "relay",
        "resuming",
        "src",
        "src_fd",
        "to_client",
    )

    def __init__(
        self, relay: SpliceRelay, src: Socket, dst: Socket, fds: tuple[int, int], to_client: bool
    ) -> None:
        self.relay = relay
        self.src = src
        self.dst = dst
        self.src_fd, self.dst_fd = fds  # the relay's: fileno() is a method call each
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
        self.resuming = False
        """The budget ran out before ``EAGAIN``: the source may hold a part-read skb."""
        self.nagle = not to_client
        """Whether ``dst`` still has Nagle's algorithm on: the backend socket gets TCP_NODELAY
        just before its second write (see :meth:`SpliceRelay._send_first`); the client socket
        inherits it from the listening socket."""
        self.out_watched = not to_client
        """Whether ``dst``'s EPOLLOUT edges are reported: the backend's are (its connect is
        watched for them); the client's only once a write to it would block (see
        :meth:`wait_writable`)."""

    def wait_writable(self) -> None:
        """``dst`` is full: report its EPOLLOUT edges from now on (the modification reports at
        once if it has room already, so no edge is lost). The client socket is registered
        without them: the ACKs of a short answer would wake the loop twice per connection for
        nothing (measured: 1.94 such wake-ups per connection)."""
        if not self.out_watched:
            self.out_watched = True
            self.relay.poller.modify(self.dst_fd, EDGE_EVENTS)

    def no_delay(self) -> None:
        """Turn Nagle's algorithm off on ``dst`` before a write that could wait for it."""
        self.nagle = False
        self.dst.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def pump(self, short_ok: bool = False, fin: bool = False) -> None:
        """Move bytes until the source is drained, the destination is full, or the budget ends.

        Edge-triggered: stopping early without ``EAGAIN`` would wait for an edge that may never
        come, so the budget's end schedules the rest with ``call_soon``. ``short_ok``: the wake-up
        was a plain EPOLLIN (no FIN seen), so a short ``recv`` proves the socket drained (TCP
        copies all it has) and the ``EAGAIN`` probe can be skipped; any later byte is a new edge.
        ``fin``: the wake-up said EPOLLRDHUP, the source's FIN is in: every byte before it is
        already queued, so a short ``recv`` was the last data and the ``recv`` that would
        return 0 is skipped (a server closing after its answer costs one system call fewer).
        """
        relay = self.relay
        if self.head and not self._send_head():
            return
        budget = _BUDGET
        while True:
            if self.pending:
                if not self._deliver():
                    return
                continue
            if self.eof:
                return
            budget -= 1
            if budget < 0:
                self.resuming = True
                relay.loop.call_soon(self.resume)
                return
            if not (self._copy(short_ok, fin) if self.copy else self._splice_in()):
                return

    def _deliver(self) -> bool:
        """Splice the pipe's bytes on to ``dst``; False when this wake-up is over."""
        pipe = self.pipe
        assert pipe is not None
        if self.nagle:
            self.no_delay()
        try:
            m = _splice(pipe[0], self.dst_fd, self.pending, flags=_FLAGS)  # type: ignore[misc]
        except BlockingIOError:
            self.wait_writable()
            return False  # the destination's EPOLLOUT edge resumes us
        except OSError as err:
            self.relay.failed(err)
            return False
        self.pending -= m
        self.relay.progress(m, self.to_client)
        return True

    def _splice_in(self) -> bool:
        """Splice what ``src`` has into the pipe; False when this wake-up is over."""
        relay = self.relay
        pipe = self.pipe
        if pipe is None:
            pipe = self.pipe = self._take_pipe()
            if pipe is None:
                return True  # out of descriptors: the next read is copied
        try:
            n = _splice(self.src_fd, pipe[1], relay.pool.size, flags=_FLAGS)  # type: ignore[misc]
        except BlockingIOError:
            self.pipe = None
            relay.pool.give(pipe)
            return False
        except OSError as err:
            relay.failed(err)
            return False
        if n == 0:
            self.pipe = None
            relay.pool.give(pipe)
            self._ended()
            return False
        self.pending = n
        return True

    def _take_pipe(self) -> tuple[int, int] | None:
        """A pipe from the pool; None when out of descriptors (this direction copies again)."""
        pool = self.relay.pool
        try:
            return pool.take()
        except OSError as err:
            pool.unavailable(err)
            self.copy = True
            return None

    def _copy(self, short_ok: bool, fin: bool = False) -> bool:
        """Relay one read through the loop's shared buffer; False when this wake-up is over.

        For small messages recv/send costs less than splice's two pipe operations (measured:
        keep-alive requests). A read that fills the buffer means bulk: splice from then on.
        What the destination does not take at once is kept as ``head`` (at most one buffer).
        """
        relay = self.relay
        buf = relay.poller.scratch
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
        if self.nagle:
            self.no_delay()
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
            self.wait_writable()
            return False  # the destination's EPOLLOUT edge resumes us
        if n < len(buf):
            if fin:  # drained up to the FIN (see pump): pass it on without reading it
                self._ended()
                return False
            return not short_ok
        return True

    def resume(self) -> None:
        self.resuming = False
        if not self.relay.closed:
            self.pump()

    def _send_head(self) -> bool:
        """Send what is left of ``head``; True once all of it is out."""
        if self.nagle:
            self.no_delay()
        try:
            sent = self.dst.send(self.head)
        except BlockingIOError:
            sent = 0
        except OSError as err:
            self.relay.failed(err)
            return False
        self.head = self.head[sent:]
        if self.head_counts and sent:
            self.relay.progress(sent, self.to_client)
        if self.head:
            self.wait_writable()  # the destination's EPOLLOUT edge resumes us
            return False
        return True

    def _ended(self) -> None:
        """``src`` sent FIN and everything before it is delivered: pass the FIN on."""
        self.eof = True
        relay = self.relay
        other = relay.to_backend if self.to_client else relay.to_client
        if not other.eof:
            # if the other side is already gone, its own read or write will say so (try, not
            # contextlib.suppress: compiled, its __enter__/__exit__ are three interpreted calls
            # on every connection's FIN)
            try:  # noqa: SIM105
                self.dst.shutdown(_SHUT_WR)
            except OSError:
                pass
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


class SpliceRelay(poller.NativeHandler):
    """Relays one connection between ``client`` and ``backend`` with ``os.splice``.

    Owns both sockets from :meth:`start` on and closes them when both directions have ended, on
    any socket error, or on :meth:`close` (idle timeout, shutdown); then calls
    ``conn.relay_closed(reason)`` exactly once.
    """

    __slots__ = (
        "backend",
        "client",
        "client_fd",
        "closed",
        "conn",
        "first_reason",
        "loop",
        "poller",
        "pool",
        "to_backend",
        "to_client",
    )
    __deletable__ = ("to_backend", "to_client")  # for mypyc, which refuses ``del`` otherwise

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: Socket,
        backend: Socket,
        conn: RelayConn,
        pool: PipePool = POOL,
    ) -> None:
        self.loop = loop
        self.client = client
        self.backend = backend
        client_fd = self.client_fd = client.fileno()
        backend_fd = backend.fileno()
        self.conn = conn
        self.pool = pool
        watch = _last_poller
        if watch is None or watch.loop is not loop:
            watch = _remember_poller(loop)
        self.poller = watch
        self.to_backend = _Direction(self, client, backend, (client_fd, backend_fd), False)
        self.to_client = _Direction(self, backend, client, (backend_fd, client_fd), True)
        self.first_reason: EndReason | None = None
        self.closed = False

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
        watch = self.poller
        # registering reports what is already pending (edge-triggered sets start "ready"); the
        # backend comes from its connect watch, which may have seen its first bytes already
        watch.take(self.client, self.client_fd, self, INPUT_EVENTS)  # output when a write blocks
        backend_fd = self.to_client.src_fd
        seen = watch.take_input(self.backend, backend_fd, self)
        if seen < 0:  # connected without a wake-up: added for input only, as the client is
            up = self.to_backend
            up.out_watched = False
            if up.head:  # the first write did not all go: its EPOLLOUT edge resumes it
                up.wait_writable()
        elif seen:
            self.event(backend_fd, seen)

    def _send_first(self, first: bytes) -> None:
        watch = self.poller
        buf = watch.scratch
        size = len(first)
        n = 0
        reset: OSError | None = None
        into: memoryview | None = None
        at = 0
        if size <= SCRATCH_ROOM:  # the usual header: the client's bytes go after a fixed room
            into = watch.room  # (a view made once, not a slice per connection)
            at = SCRATCH_ROOM - size
        elif size < len(buf) // 2:  # a long header (many TLVs): right after it
            into = buf[size:]
        if into is not None:
            try:
                n = self.client.recv_into(into)
            except BlockingIOError:
                n = 0
            except OSError as err:
                # the client is gone (e.g. a health check that resets at once): the header
                # and what came before the reset still go to the backend, then both close
                reset = err
            # n == 0 at EOF too: the registration below reports it again
            if n:
                self.progress(n, False)
                if n == len(into):
                    self.to_backend.copy = False  # a full read: bulk
        out: memoryview | bytes = first
        if n:  # the header in front of the client's bytes: one write
            buf[at : at + size] = first
            out = buf[at : at + size + n]
        if len(out) > _ONE_SEGMENT:
            self.to_backend.no_delay()
        # else: a first write on a new connection that fits one segment leaves at once, Nagle
        # or not (nothing is unacknowledged yet); TCP_NODELAY waits for a second write, which
        # a short connection never makes (one system call fewer)
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
        try:
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
                reader.pump(not events & _HUP, bool(events & EPOLLRDHUP))
        except OSError as err:  # whatever a system call said, it ends this connection only
            self.failed(err)

    def progress(self, n: int, to_client: bool) -> None:
        conn = self.conn
        if isinstance(conn, NativeConn):  # C fields (see NativeConn)
            if to_client:
                conn.bytes_to_client += n
            else:
                conn.bytes_from_client += n
        elif to_client:
            conn.bytes_to_client += n
        else:
            conn.bytes_from_client += n

    def half_closed(self, to_client: bool) -> None:
        """One direction has ended with a FIN; close when both have."""
        if self.first_reason is None:
            self.first_reason = _BACKEND_CLOSED if to_client else _CLIENT_CLOSED
        if self.to_backend.eof and self.to_client.eof:
            self.close(self.first_reason)

    def failed(self, err: OSError) -> None:
        """A socket error (reset, broken pipe): reset and close both sides now."""
        # like the stream relay: the other side is reset too, not given a clean FIN
        reset_socket(self.client)
        reset_socket(self.backend)
        self.close(error_reason(err.errno))

    def close(self, reason: EndReason) -> None:
        """Stop relaying, close both sockets, report ``reason`` (once)."""
        if self.closed:
            return
        self.closed = True
        self.poller.forget(self.client_fd)
        self.poller.forget(self.to_client.src_fd)
        self.to_backend.stop()
        self.to_client.stop()
        # The directions point back at the relay: without that cycle, the connection's objects
        # go at once by reference counting, not in the cyclic GC's next pass (which walks every
        # young object; measured: 10k fewer user-space instructions per connection).
        del self.to_backend, self.to_client
        # closing removes them from the epoll set
        self.client.close()
        self.backend.close()
        conn = self.conn
        if isinstance(conn, NativeConn):
            conn.relay_closed(reason)  # a C call (see NativeConn)
        else:
            conn.relay_closed(reason)

    # -- the kernel relay's hand-over (l4lb.balancer.kernel_relay) ---------------------------

    def idle(self) -> bool:
        """Nothing waits in a pipe or a buffer, no FIN was seen, and each source's last read
        drained it (``EAGAIN`` or a short read: no skb in its queue is read part of the way):
        the sockets can change relay."""
        up, down = self.to_backend, self.to_client
        return not (
            self.closed
            or up.pending
            or up.head
            or up.eof
            or up.resuming
            or down.pending
            or down.head
            or down.eof
            or down.resuming
        )

    def detach(self) -> None:
        """Stop relaying (only when :meth:`idle`) without closing or reporting: another relay
        owns the sockets from now on; a resume already scheduled does nothing."""
        self.closed = True
        self.to_backend.stop()
        self.to_client.stop()


_last_poller: poller.Poller | None = None
"""The last loop's poller (a worker has one loop): poller.for_loop's WeakKeyDictionary makes a
new weak reference on every look-up."""


def _remember_poller(loop: asyncio.AbstractEventLoop) -> poller.Poller:
    global _last_poller
    _last_poller = poller.for_loop(loop)
    return _last_poller


def start_splice_relay(
    loop: asyncio.AbstractEventLoop,
    client_sock: Socket,
    backend_sock: Socket,
    first: bytes,
    conn: RelayConn,
) -> SpliceRelay:
    """Relay ``client_sock`` <-> ``backend_sock`` by splice; same shape as the stream relay.

    Edge-triggered reads go on until ``EAGAIN``, so both sockets must be non-blocking; the
    listener and the connector already make them so, which ``gettimeout()`` tells without a
    system call.
    """
    for sock in (client_sock, backend_sock):
        if sock.gettimeout() != 0.0:
            sock.setblocking(False)
    return start_nonblocking(loop, client_sock, backend_sock, first, conn)


def start_nonblocking(
    loop: asyncio.AbstractEventLoop,
    client_sock: Socket,
    backend_sock: Socket,
    first: bytes,
    conn: RelayConn,
) -> SpliceRelay:
    """:func:`start_splice_relay` for sockets the caller knows are non-blocking (a
    :class:`~l4lb.balancer.connection.Connection`'s): no ``gettimeout()`` check."""
    # TCP_NODELAY: the client's comes from the listening socket, the backend's is set by the
    # relay before any write that could wait on Nagle (_Direction.nagle)
    relay = SpliceRelay(loop, client_sock, backend_sock, conn)
    relay.start(first)
    return relay
