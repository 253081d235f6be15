"""The stream relay: two asyncio Protocols passing bytes between a client and a backend.

One implementation of :mod:`l4lb.balancer.relay_contract` (``relay = "stream"``; the default is
``"splice"``, which falls back to this one where ``os.splice`` is missing).
Rules kept here (the contract's): byte-exact in both directions; half-close (a FIN one way becomes
``shutdown(SHUT_WR)`` the other way while the opposite direction keeps flowing); a reset on one
side resets the other at once; backpressure (above a side's write-buffer high-water mark, reading
from the other side pauses until it drains, so memory stays bounded with a slow reader).

A paused side is not read, so the loop would not see it reset; while paused it sits in a per-loop
epoll set that reports only errors and hang-ups (:meth:`~l4lb.balancer.poller.Poller.watch_errors`),
and a reset there resets both sides at once instead of at the next write or the idle timeout.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any, cast

from l4lb.balancer import poller
from l4lb.balancer.relay_contract import (
    EndReason,
    Relay,
    RelayConn,
    Socket,
    error_reason,
    python_socket,
    reset_socket,
)

log = logging.getLogger("l4lb.relay")


def drive(coro: Coroutine[Any, Any, Any], on_error: Callable[[BaseException], None]) -> None:
    """Run a coroutine to completion from callbacks, without creating a Task for it.

    ``connect_accepted_socket`` is a coroutine that only waits for its transport's
    ``connection_made``; a Task per connection would cost more than the wait itself.
    """
    try:
        fut = coro.send(None)
    except StopIteration:
        return
    except BaseException as err:
        on_error(err)
        return
    fut.add_done_callback(lambda _: drive(coro, on_error))


def _paused_watch(loop: asyncio.AbstractEventLoop) -> poller.Poller | None:
    if not poller.available():
        return None  # elsewhere a paused side's reset waits for the next write or the timeout
    return poller.for_loop(loop)


class _Side(asyncio.Protocol):
    """One socket of the relay; ``peer`` is the other side."""

    __slots__ = ("conn", "eof", "lost", "out", "peer", "relay", "sock", "transport", "watched")

    def __init__(self, relay: StreamRelay, sock: socket.socket) -> None:
        self.relay = relay
        self.conn = relay.conn
        self.sock = sock
        self.transport: asyncio.Transport | None = None
        self.out: asyncio.Transport | None = None
        """The peer's transport, where this side's bytes go (None until it is attached)."""
        self.peer: _Side
        self.eof = False
        self.lost = False
        self.watched = -1
        """The descriptor under the poller's error watch while reading is paused, else -1."""

    def pause_writing(self) -> None:
        t = self.peer.transport
        if t is not None and not t.is_closing():
            t.pause_reading()
            self.peer.watch_errors()

    def resume_writing(self) -> None:
        peer = self.peer
        peer.unwatch()
        t = peer.transport
        if t is not None and not t.is_closing():
            t.resume_reading()

    def watch_errors(self) -> None:
        """Paused: have the loop's poller report a reset or hang-up of this side."""
        watch = _paused_watch(self.relay.loop)
        fd = self.sock.fileno()
        if watch is None or fd < 0 or self.watched == fd:
            return
        if watch.watch_errors(fd, self):
            self.watched = fd

    def unwatch(self) -> None:
        fd = self.watched
        if fd >= 0:
            self.watched = -1
            poller.for_loop(self.relay.loop).unwatch(fd, self)

    def event(self, fd: int, events: int) -> None:
        """The poller saw an error or hang-up while this side was paused."""
        self.unwatch()
        self.paused_hangup()

    def paused_hangup(self) -> None:
        """This side, paused, reported an error or hang-up: on a reset, reset both now."""
        if self.lost:
            return
        try:
            code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            return
        if not code:
            return  # both FINs seen: nothing is lost by waiting for the resume
        relay = self.relay
        if relay.reason is None:
            relay.reason = error_reason(code)
        reset_socket(self.sock)
        reset_socket(self.peer.sock)
        relay.close(relay.reason)

    def eof_received(self) -> bool:
        relay = self.relay
        self.eof = True
        if relay.reason is None:
            relay.reason = self.closed_reason
        peer = self.peer
        if peer.eof:
            # Both directions are finished: close both (close() still flushes what is buffered).
            if peer.transport is not None:
                peer.transport.close()
            return False
        if peer.transport is not None and not peer.transport.is_closing():
            try:
                peer.transport.write_eof()
            except OSError:
                peer.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        relay = self.relay
        self.unwatch()
        peer = self.peer
        if exc is not None and relay.reason is None:
            relay.reason = EndReason.RESET
        if peer.lost:
            relay.done()
            return
        t = peer.transport
        if t is None:
            # The peer is still being attached: it closes itself as soon as it is.
            relay.aborted = relay.reason or EndReason.CLOSED
            return
        if exc is not None:
            reset_socket(peer.sock)
            t.abort()
        elif not t.is_closing():
            t.close()

    closed_reason = EndReason.CLOSED


class _ClientSide(_Side):
    __slots__ = ()
    closed_reason = EndReason.CLIENT_CLOSED

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        relay = self.relay
        peer = self.peer
        self.out = peer.transport
        peer.out = self.transport
        if relay.pending:
            self.transport.write(b"".join(relay.pending))
            relay.pending = []
        if peer.eof:
            self.transport.write_eof()
        if relay.aborted is not None:
            relay.close(relay.aborted)

    def data_received(self, data: bytes) -> None:
        self.conn.bytes_from_client += len(data)
        self.out.write(data)  # type: ignore[union-attr]


class _BackendSide(_Side):
    __slots__ = ()
    closed_reason = EndReason.BACKEND_CLOSED

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        relay = self.relay
        if relay.first:
            self.transport.write(relay.first)
            relay.first = b""
        loop = relay.loop
        drive(
            loop.connect_accepted_socket(lambda: self.peer, self.peer.sock),
            relay.attach_failed,
        )

    def data_received(self, data: bytes) -> None:
        self.conn.bytes_to_client += len(data)
        out = self.out
        if out is None:  # the client transport is not attached yet (same loop iteration)
            self.relay.pending.append(data)
        else:
            out.write(data)


class StreamRelay:
    """The two sides of one relayed connection."""

    __slots__ = (
        "aborted",
        "backend",
        "client",
        "conn",
        "finished",
        "first",
        "loop",
        "pending",
        "reason",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client_sock: socket.socket,
        backend_sock: socket.socket,
        first: bytes,
        conn: RelayConn,
    ) -> None:
        self.loop = loop
        self.conn = conn
        self.first = first
        self.pending: list[bytes] = []
        self.reason: EndReason | None = None
        self.aborted: EndReason | None = None
        self.finished = False
        self.client = _ClientSide(self, client_sock)
        self.backend = _BackendSide(self, backend_sock)
        self.client.peer = self.backend
        self.backend.peer = self.client

    def start(self) -> None:
        drive(
            self.loop.connect_accepted_socket(lambda: self.backend, self.backend.sock),
            self.attach_failed,
        )

    def attach_failed(self, err: BaseException) -> None:
        log.error("event=relay_attach_failed error=%r", err)
        for side in (self.client, self.backend):
            if side.transport is None:
                side.lost = True
                side.sock.close()
        self.close(EndReason.ERROR)
        if self.client.lost and self.backend.lost:
            self.done()

    def close(self, reason: EndReason) -> None:
        """Close both sides now (idle timeout, shutdown), discarding buffered data."""
        if self.reason is None or reason in (EndReason.IDLE_TIMEOUT, EndReason.SHUTDOWN):
            self.reason = reason
        self.aborted = reason
        for side in (self.client, self.backend):
            t = side.transport
            if t is not None and not side.lost:
                t.abort()

    def done(self) -> None:
        if not self.finished:
            self.finished = True
            self.conn.relay_closed(self.reason or EndReason.CLOSED)


def start_relay(
    loop: asyncio.AbstractEventLoop,
    client_sock: Socket,
    backend_sock: Socket,
    first: bytes,
    conn: RelayConn,
) -> Relay:
    """Relay between two connected non-blocking sockets; ``first`` goes to the backend first."""
    client, backend = python_socket(client_sock), python_socket(backend_sock)  # for uvloop
    relay = StreamRelay(loop, client, backend, first, conn)
    relay.start()
    return relay
