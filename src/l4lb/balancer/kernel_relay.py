"""The kernel relay (``relay = "kernel"``): an eBPF sockmap moves the bytes, the process watches.

One implementation of :mod:`l4lb.balancer.relay_contract`, opt-in, for long-lived connections:
a connection starts on the splice relay and is handed over once it has proved long-lived
(:class:`Handover`, :class:`_Probation`), so a short one never pays for the insertion. From then
on (or at once, with :data:`AT_ONCE`, after the PROXY header is written), both sockets go into a
``SOCKMAP`` whose ``SK_SKB`` verdict program (assembled in
:mod:`l4lb.balancer.kernel_path`, loaded with :mod:`l4lb.balancer.bpf`: no bcc, no clang)
redirects every received skb to the peer socket's egress, so bytes never enter the process. Per
worker, one :class:`~l4lb.balancer.kernel_path.KernelPath` holds:

- ``slots``: a hash from socket cookie to the socket's slot;
- ``socks``: the sockmap, slot -> socket;
- ``state``: an ``mmap``-ed array of per-slot counters shared with the program without a
  system call (``redirected``, ``passed``, ``armed``, ``credit``, ``asked``, ``peer``,
  ``copied``, ``want``: see :mod:`l4lb.balancer.kernel_path`);
- ``ring``: a ring buffer where the program posts a slot when it switches a direction or asks
  for credit.

The program: drop a 0-byte skb (a redirected one breaks the peer with EPIPE); redirect while
``passed == armed`` (no byte passed to this process is left unread) and ``redirected`` stays
within ``credit``; otherwise pass it to the socket's own receive queue, where this process reads
it (**user mode**: copied like the splice relay's small messages). A failed redirect (the peer
not in the map yet) passes too, so no byte is ever dropped and none overtakes another. Once this
process has written on every passed byte (``copied == passed``) the program redirects again by
itself (``armed = passed``, a new credit). The rules the contract asks for:

- **Order at the start**: the header is written before the insertion; bytes that arrived before
  it wait in the socket until a read, so each socket is read once (non-blocking) after both are
  in: the read pushes them through the program, in order.
- **Backpressure**: a direction may have at most :data:`BACKLOG_LIMIT` redirected bytes beyond
  what its destination has taken. At a quarter used the program asks (ring) and this process
  extends the credit by what the destination took (``tcp_info``); at the credit the program
  passes, so the bytes count against the source socket's receive buffer and TCP flow control
  stops the sender. This process then waits until the destination has taken every redirected
  byte (:meth:`_Direction.drained`) and copies the passed ones after them. A socket is never
  deleted and re-inserted to pause it (that loses the bytes queued in it).
- **FIN**: not forwarded by the kernel. The source shows ``EPOLLRDHUP``; its ``recv`` answers
  ``b""``, which is believed only when every passed byte was read (they can wait in the psock
  queue behind bytes redirected to that socket); the FIN goes on (``shutdown(SHUT_WR)``) once
  the destination's send queue holds every byte before it: ``tcp_info.bytes_acked + SIOCOUTQ``
  (bytes ever written into it) equals this process's own writes plus the source's
  ``redirected`` count. The source's ``bytes_received`` would count the FIN and the passed
  bytes, so the program's own count is the reference.
- **Resets**: ``EPOLLERR`` on either socket resets both, as the other relays do.
- **Retransmissions that overlap**: TCP queues a segment that starts before what the socket has
  received whole (its readers skip the old part by sequence number) and the sockmap hands the
  program the whole skb, so the program cuts the old head itself, by the skb's sequence
  numbers (:func:`~l4lb.balancer.kernel_path.program`); otherwise those bytes go out twice.
- **A socket that is no longer ESTABLISHED** cannot be inserted: if the client's insertion
  fails the connection falls back to the default relay; if the backend's fails (the client's
  is in), both directions stay in user mode for the connection's life.
- **Counters** (access log, idle timeouts): user-mode bytes are counted as sent, redirected ones
  come from ``state``; :func:`refresh` brings them up to date before each idle sweep.

While a direction is in the kernel its source socket is watched for ``EPOLLRDHUP`` only (plus
errors), so redirected traffic wakes nothing in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from l4lb.balancer import poller, splice
from l4lb.balancer.kernel_path import (
    ARMED,
    ASKED,
    BACKLOG_LIMIT,
    COPIED,
    CREDIT,
    NEVER,
    PASSED,
    REDIRECTED,
    WANT,
    WORDS,
    KernelPath,
    SelfTestError,
    self_test,
    written,
)
from l4lb.balancer.poller import EPOLLERR, EPOLLET, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP
from l4lb.balancer.relay_contract import (
    EndReason,
    Relay,
    RelayConn,
    Socket,
    StartRelay,
    error_reason,
    reset_socket,
)

__all__ = [
    "AT_ONCE",
    "BACKLOG_LIMIT",
    "HANDOVER",
    "Handover",
    "KernelPath",
    "KernelRelay",
    "SelfTestError",
    "make_start",
    "prepare",
    "refresh",
    "requirements",
]

log = logging.getLogger("l4lb.relay")

REQUIREMENTS = (
    'relay = "kernel" needs Linux >= 5.13 (BPF_SK_SKB_VERDICT) and CAP_BPF + CAP_NET_ADMIN '
    "(or root); l4lb run tests it at start and falls back to the default relay when it fails"
)

_QUIET = EPOLLRDHUP | EPOLLET
"""A socket's mask while both its directions are in the kernel (errors and hang-ups come too)."""
_IN = EPOLLIN | EPOLLRDHUP | EPOLLHUP
_WAIT_FIRST, _WAIT_MAX = 0.0005, 0.01
"""Polling a destination that still has redirected bytes to take: from 0.5 ms, doubling to 10 ms."""
_BUDGET = 16


def requirements() -> str:
    """What ``relay = "kernel"`` needs (``l4lb check`` prints it)."""
    return REQUIREMENTS


# -- one connection --------------------------------------------------------------------------


class _Direction:
    """One way through the relay: ``src`` -> ``dst``, in the kernel or with this process."""

    __slots__ = (
        "absorbed",
        "consumed",
        "dst",
        "dst_connected",
        "dst_fd",
        "eof",
        "head",
        "relay",
        "sent",
        "shut",
        "slot",
        "src",
        "src_fd",
        "to_client",
        "user",
        "user_bytes",
        "wait",
        "waiting",
    )

    def __init__(self, relay: KernelRelay, src: Socket, dst: Socket, to_client: bool) -> None:
        self.relay = relay
        self.src = src
        self.src_fd = src.fileno()
        self.dst = dst
        self.dst_fd = dst.fileno()
        self.to_client = to_client
        self.dst_connected = not to_client
        """The backend socket is the one we connected (its ``bytes_acked`` counts its SYN)."""
        self.slot = -1
        """The source's slot (-1: not in the map)."""
        self.user = True
        """Whether this process reads the source (its mask has EPOLLIN); the program's state
        decides (:meth:`in_kernel`), this follows it."""
        self.consumed = 0
        """Bytes read from ``src`` (the program's ``passed`` once all are read)."""
        self.sent = 0
        """Bytes this process wrote to ``dst``, the PROXY header included."""
        self.user_bytes = 0
        """Relayed bytes among them (the header excluded)."""
        self.absorbed = 0
        """A ``redirected`` count ``dst`` is known to have taken in full."""
        self.head = b""
        self.eof = False
        self.shut = False
        """The FIN was passed on."""
        self.wait = _WAIT_FIRST
        self.waiting: asyncio.TimerHandle | None = None

    # -- the state the program shares --------------------------------------------------------

    def redirected(self) -> int:
        if self.slot < 0:
            return 0
        return int(self.relay.path.state[self.slot * WORDS + REDIRECTED])

    def drained(self) -> bool:
        """True when ``dst`` holds (or has sent) every byte redirected to it from ``src``;
        ``absorbed`` becomes the redirected bytes it has taken."""
        redirected = self.redirected()
        if redirected == self.absorbed:
            return True
        taken = min(written(self.dst, self.dst_connected) - self.sent, redirected)
        if taken > self.absorbed:
            self.absorbed = taken
        if taken >= redirected:
            self.wait = _WAIT_FIRST
            return True
        return False

    # -- moving bytes --------------------------------------------------------------------------

    def in_kernel(self) -> bool:
        """The program redirects this direction's bytes (it has none for this process)."""
        if self.slot < 0:
            return False
        base = self.slot * WORDS
        st = self.relay.path.state
        return bool(st[base + PASSED] == st[base + ARMED])

    def _passed_unread(self) -> bool:
        """The program passed bytes to this process that it has not read yet."""
        if self.slot < 0:
            return False
        return bool(self.relay.path.state[self.slot * WORDS + PASSED] != self.consumed)

    def ring_posted(self) -> None:
        if not self.relay.closed:
            self.relay.guard(self.sync)

    def sync(self) -> None:
        """A ring record (the program switched this direction, or asks for credit): follow it,
        read what is ours, extend the credit by what the destination has taken."""
        if self.in_kernel():
            if self.user:
                self.user = False
                self.relay.update_mask(self.src)
            if self.relay.path.state[self.slot * WORDS + ASKED]:
                self.refill()
        else:
            if not self.user:
                # handed back: watch EPOLLIN first. The record can come before the passed skb
                # is in the socket's queue (the psock queues it after the verdict), so the read
                # below may meet EAGAIN, and without EPOLLIN nothing would wake us for it
                self.user = True
                self.relay.update_mask(self.src)
            self.pump()

    def refill(self) -> None:
        """More credit: the destination's backlog may again hold :data:`BACKLOG_LIMIT` bytes
        beyond what it has taken. Until it has taken half, look again later (and on EPOLLOUT);
        meanwhile the program runs into the credit and hands the direction back."""
        path = self.relay.path
        base = self.slot * WORDS
        st = path.state
        self.drained()  # updates ``absorbed`` (system calls only when something is in flight)
        credit = self.absorbed + path.limit
        if credit > st[base + CREDIT]:
            st[base + CREDIT] = credit
        if credit - st[base + REDIRECTED] > path.limit - path.limit // 4:
            st[base + ASKED] = 0
            self.wait = _WAIT_FIRST
        else:
            self._wait()

    def step(self) -> None:
        """A timer or EPOLLOUT: whatever this direction waits for."""
        if self.relay.closed:
            return
        if self.head or self.eof or self.user or not self.in_kernel():
            self.pump()  # bytes or a FIN wait for the destination to take what came before
        elif self.relay.path.state[self.slot * WORDS + ASKED]:
            self.refill()

    def pump(self) -> None:
        """Read what this process must, write it on in order, pass a FIN on."""
        relay = self.relay
        budget = _BUDGET
        buf = relay.poller.scratch
        while not relay.closed:
            if self.head:
                if not self.drained():
                    self._wait()
                    return
                if not self._send(self.head):
                    return
                continue
            if self.eof:
                if self.shut:
                    return
                if not self.drained():
                    self._wait()
                    return
                self._ended()
                return
            budget -= 1
            if budget < 0:
                relay.loop.call_soon(self.resume)
                return
            try:
                n = self.src.recv_into(buf)
            except BlockingIOError:
                # nothing passed is left to read; if the program has gone back to the kernel,
                # stop watching EPOLLIN (its next hand-back posts a ring record)
                if self.user and self.in_kernel():
                    self.user = False
                    relay.update_mask(self.src)
                return
            except OSError as err:
                relay.failed(err)
                return
            if n == 0:
                if self._passed_unread():
                    # bytes passed to us still wait in the psock's queue (behind bytes
                    # redirected to this socket): the FIN is not theirs to overtake
                    if not self.user:
                        self.user = True
                        relay.update_mask(self.src)
                    self._wait()
                    return
                self.eof = True
                continue
            self.consumed += n
            if not self.user:
                self.user = True
                relay.update_mask(self.src)
            if self.drained():
                self._send(bytes(buf[:n]))
            else:
                self.head = bytes(buf[:n])

    def _send(self, data: bytes) -> bool:
        """Write ``data`` to ``dst``; what it does not take stays in ``head``. True: all out."""
        try:
            sent = self.dst.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as err:
            self.relay.failed(err)
            return False
        self.sent += sent
        self.user_bytes += sent
        self.relay.progress(sent, self.to_client)
        had_head = bool(self.head)
        self.head = data[sent:]
        if self.head or had_head:
            self.relay.update_mask(self.dst)  # EPOLLOUT while something waits for it
        if self.head:
            return False
        if self.slot >= 0:  # every byte read is written on: the program may redirect again
            self.relay.path.state[self.slot * WORDS + COPIED] = self.consumed
        return True

    def _wait(self) -> None:
        """``dst`` still has redirected bytes to take: look again soon (and on EPOLLOUT)."""
        if self.waiting is None:
            self.waiting = self.relay.loop.call_later(self.wait, self._waited)
            self.wait = min(self.wait * 2, _WAIT_MAX)
            self.relay.update_mask(self.dst)

    def _waited(self) -> None:
        self.waiting = None
        self.relay.guard(self.step)
        self.relay.update_mask(self.dst)

    def resume(self) -> None:
        if not self.relay.closed:
            self.relay.guard(self.pump)

    def _ended(self) -> None:
        """``src`` sent FIN and ``dst`` holds everything before it: pass the FIN on."""
        relay = self.relay
        self.shut = True
        other = relay.to_backend if self.to_client else relay.to_client
        if not other.eof:
            with contextlib.suppress(OSError):
                self.dst.shutdown(socket.SHUT_WR)
        relay.half_closed(self.to_client)

    def wants_out(self) -> bool:
        return bool(self.head) or self.waiting is not None

    def stop(self) -> None:
        if self.waiting is not None:
            self.waiting.cancel()
            self.waiting = None


class KernelRelay:
    """Relays one connection through the kernel's sockmap; owns both sockets from the start."""

    __slots__ = (
        "__weakref__",
        "backend",
        "client",
        "client_fd",
        "closed",
        "conn",
        "first_reason",
        "keys",
        "loop",
        "masks",
        "path",
        "poller",
        "to_backend",
        "to_client",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        path: KernelPath,
        client: Socket,
        backend: Socket,
        conn: RelayConn,
    ) -> None:
        self.loop = loop
        self.path = path
        self.client = client
        self.backend = backend
        self.client_fd = client.fileno()
        self.conn = conn
        self.poller = poller.for_loop(loop)
        self.to_backend = _Direction(self, client, backend, to_client=False)
        self.to_client = _Direction(self, backend, client, to_client=True)
        self.keys: list[tuple[bytes | None, int]] = []
        self.masks: dict[int, int] = {}
        self.first_reason: EndReason | None = None
        self.closed = False

    def begin(self) -> None:
        """The slots are armed and the client is in the map: put the backend in, then read."""
        try:
            self._begin()
        except OSError as err:  # an epoll registration refused (out of memory): this one ends
            self.failed(err)

    def _begin(self) -> None:
        path = self.path
        up, down = self.to_backend, self.to_client
        client_slot, backend_slot = up.slot, down.slot
        path.owners[client_slot] = up
        path.owners[backend_slot] = down
        up.user = down.user = False
        try:
            self.keys.append((path.insert(self.backend, backend_slot), backend_slot))
        except OSError:
            # no longer ESTABLISHED (a FIN came): the client's bytes are passed to us from now
            # on (their redirect fails), so both ways are copied by this process
            path.owners.pop(backend_slot, None)
            path.free.append(backend_slot)
            down.slot = -1
            down.user = up.user = True
            path.state[client_slot * WORDS + WANT] = 0
            path.state[client_slot * WORDS + ARMED] = NEVER
        mask = self._mask(self.client)
        self.masks[self.client_fd] = mask
        self.poller.take(self.client, self.client_fd, self, mask)
        mask = self._mask(self.backend)
        self.masks[down.src_fd] = mask
        self.poller.take(self.backend, down.src_fd, self, mask)
        # the read after the insertion: bytes that came before it go through the program now
        self.guard(up.pump)
        self.guard(down.pump)

    def _mask(self, sock: Socket) -> int:
        if sock is self.client:
            out_of, into = self.to_backend, self.to_client
        else:
            out_of, into = self.to_client, self.to_backend
        mask = _QUIET
        if out_of.user:
            mask |= EPOLLIN
        if into.wants_out():
            mask |= EPOLLOUT
        return mask

    def update_mask(self, sock: Socket) -> None:
        if self.closed:
            return
        fd = sock.fileno()
        mask = self._mask(sock)
        if self.masks.get(fd) != mask:
            self.masks[fd] = mask
            self.poller.modify(fd, mask)

    def guard(self, step: Callable[[], None]) -> None:
        try:
            step()
        except OSError as err:
            self.failed(err)

    def event(self, fd: int, events: int) -> None:
        """Readiness of one of our sockets, from the poller."""
        if self.closed:
            return
        if fd == self.client_fd:
            reader, writer, sock = self.to_backend, self.to_client, self.client
        else:
            reader, writer, sock = self.to_client, self.to_backend, self.backend
        if events & EPOLLERR:
            with contextlib.suppress(OSError):  # what came before the reset goes first
                if reader.user and not reader.eof:
                    reader.pump()
            if not self.closed:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.ECONNRESET
                self.failed(OSError(code, os.strerror(code)))
            return
        if events & EPOLLOUT and writer.wants_out():
            self.guard(writer.step)
        if events & _IN and not self.closed:
            self.guard(reader.pump)

    def progress(self, n: int, to_client: bool) -> None:
        if to_client:
            self.conn.bytes_to_client += n
        else:
            self.conn.bytes_from_client += n

    def refresh(self) -> None:
        """Bring the connection's byte counters up to date with the program's counts; hand back
        a direction whose ring record was lost (a full ring)."""
        self.refresh_counts()
        for d in (self.to_backend, self.to_client):
            if d.waiting is not None or d.shut:
                continue
            if d.eof or d.head:
                self.guard(d.pump)
            elif d.slot >= 0:
                base = d.slot * WORDS
                if d.user == d.in_kernel() or self.path.state[base + ASKED]:
                    self.guard(d.sync)

    def half_closed(self, to_client: bool) -> None:
        if self.first_reason is None:
            self.first_reason = EndReason.BACKEND_CLOSED if to_client else EndReason.CLIENT_CLOSED
        if self.to_backend.eof and self.to_client.eof:
            self.close(self.first_reason)

    def failed(self, err: OSError) -> None:
        reset_socket(self.client)
        reset_socket(self.backend)
        self.close(error_reason(err.errno))

    def close(self, reason: EndReason) -> None:
        """Stop relaying, close both sockets (which takes them out of the sockmap), report."""
        if self.closed:
            return
        self.refresh_counts()
        self.closed = True
        self.poller.forget(self.client_fd)
        self.poller.forget(self.to_client.src_fd)
        self.to_backend.stop()
        self.to_client.stop()
        self.client.close()
        self.backend.close()
        path = self.path
        for key, slot in self.keys:
            path.release(key, slot)
        self.keys.clear()
        path.relays.discard(self)
        self.conn.relay_closed(reason)

    def refresh_counts(self) -> None:
        conn = self.conn
        conn.bytes_from_client = self.to_backend.user_bytes + self.to_backend.redirected()
        conn.bytes_to_client = self.to_client.user_bytes + self.to_client.redirected()


# -- per worker: the path, the start of a connection ---------------------------

_PATHS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, KernelPath] = (
    weakref.WeakKeyDictionary()
)
_SPARE: list[KernelPath] = []
"""The self-tested path, for the first loop that relays a connection."""


class _Fallbacks:
    """Connections the kernel path could not take; said at most every 10 s."""

    count: ClassVar[int] = 0
    quiet_until: ClassVar[float] = 0.0

    @classmethod
    def note(cls, why: str) -> None:
        cls.count += 1
        now = time.monotonic()
        if now >= cls.quiet_until:
            cls.quiet_until = now + 10.0
            log.info("event=kernel_relay_fallback count=%d detail=%r", cls.count, why)


def _path_for(loop: asyncio.AbstractEventLoop) -> KernelPath | None:
    path = _PATHS.get(loop)
    if path is None:
        try:
            path = _SPARE.pop() if _SPARE else KernelPath()
            path.bind(loop)
        except OSError as err:
            _Fallbacks.note(f"kernel path unavailable: {err}")
            return None
        _PATHS[loop] = path
        weakref.finalize(loop, path.close)  # a test's loop; a worker's lives as long as it
    return path


def refresh(loop: asyncio.AbstractEventLoop) -> None:
    """Before an idle sweep: the byte counters of every kernel-relayed connection of ``loop``."""
    path = _PATHS.get(loop)
    if path is None:
        return
    for relay in list(path.relays):
        if not relay.closed:
            relay.refresh()


@dataclass(frozen=True, slots=True)
class Handover:
    """When a ``relay = "kernel"`` connection leaves the splice relay for the kernel.

    A connection starts on the splice relay and is handed over at the first moment nothing of it
    waits in a pipe or a buffer once it has proved long-lived: its client spoke again after an
    answer ``exchanges`` times, or it still moves bytes after ``age`` seconds. Short connections
    never pay for the insertion (cookies, map updates, the kernel's psock set-up and tear-down).
    """

    exchanges: int = 3
    """Times the client speaks again after an answer: HTTP/1 keep-alive is handed over with its
    fourth request; a TLS 1.2 handshake plus one request makes two such turns, TLS 1.3 one."""
    age: float = 1.0
    """Seconds after which a connection that still moves bytes (a stream, a slow chat, bulk
    with pauses) is handed over whatever its exchanges."""

    @property
    def at_once(self) -> bool:
        """Insert right after the PROXY header (no splice phase): the relay as first built."""
        return self.exchanges <= 0 or self.age <= 0


HANDOVER = Handover()


AT_ONCE = Handover(0, 0.0)


class _Probation(splice.SpliceRelay):
    """The splice relay of a ``relay = "kernel"`` connection that has not proved long-lived yet.

    After each readiness event it counts the client's turns and, once :class:`Handover` says so
    and :meth:`~l4lb.balancer.splice.SpliceRelay.idle` holds (no byte in a pipe or buffer, no
    FIN seen, each source's last read drained it), hands both sockets to a :class:`KernelRelay`.
    Drained, because the program takes a queued skb whole: one that splice or ``recv`` had read
    part of would go out again from its start (seen: 0.3 KB to 260 KB sent twice when the
    hand-over came after a read that had stopped at its budget). Bytes that arrived since the
    last read are whole skbs: the kernel relay's read after the insertion pushes them through
    the program in order, as at a first start. A connection that is never idle (both ways
    saturated, or a destination that never drains) stays on splice.
    """

    __slots__ = (
        "down_seen",
        "due",
        "exchanges",
        "handed_at",
        "kernel",
        "path",
        "policy",
        "up_seen",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: Socket,
        backend: Socket,
        conn: RelayConn,
        path: KernelPath,
        policy: Handover,
    ) -> None:
        super().__init__(loop, client, backend, conn)
        self.path = path
        self.policy = policy
        self.kernel: KernelRelay | None = None
        self.exchanges = 0
        self.up_seen = 0
        self.down_seen = 0
        self.due = loop.time() + policy.age
        self.handed_at: tuple[int, int] | None = None
        """(bytes from the client, bytes to the client) relayed by splice before the hand-over."""

    def event(self, fd: int, events: int) -> None:
        super().event(fd, events)
        if self.closed:
            return
        conn = self.conn
        if fd == self.client_fd:
            up = conn.bytes_from_client
            if up != self.up_seen:
                self.up_seen = up
                down = conn.bytes_to_client
                if down != self.down_seen:  # the client speaks again after an answer
                    self.down_seen = down
                    self.exchanges += 1
        if (
            self.exchanges >= self.policy.exchanges or self.loop.time() >= self.due
        ) and self.idle():
            self._hand_over()

    def _hand_over(self) -> None:
        path = self.path
        self.exchanges = -(1 << 62)  # from now on the clock decides when to try again
        self.due = float("inf")  # one attempt: what fails below fails again
        relay = self._insert() if len(path.free) >= 2 else None
        if relay is None:
            if len(path.free) < 2:
                _Fallbacks.note("every slot of the kernel path is taken")
            return
        self.detach()
        self.kernel = relay
        path.handed_over += 1
        relay.begin()

    def _insert(self) -> KernelRelay | None:
        client, backend, conn = self.client, self.backend, self.conn
        try:
            # bytes this process wrote into each, header included (none redirected yet)
            to_backend = written(backend, connected=True)
            to_client = written(client, connected=False)
        except OSError:
            return None  # a dead socket: the splice relay's next read or write says so
        relay = _insert(self.loop, self.path, client, backend, conn)
        if relay is None:  # e.g. the client's FIN is in (not ESTABLISHED): splice keeps it
            return None
        up, down = relay.to_backend, relay.to_client
        up.sent, down.sent = to_backend, to_client
        up.user_bytes, down.user_bytes = conn.bytes_from_client, conn.bytes_to_client
        self.handed_at = (up.user_bytes, down.user_bytes)
        return relay

    def close(self, reason: EndReason) -> None:
        if self.kernel is not None:
            self.kernel.close(reason)
        else:
            super().close(reason)


def _insert(
    loop: asyncio.AbstractEventLoop,
    path: KernelPath,
    client_sock: Socket,
    backend_sock: Socket,
    conn: RelayConn,
) -> KernelRelay | None:
    """Arm two slots and put the client socket in the sockmap: the relay to :meth:`begin
    <KernelRelay.begin>`, or None (slots freed) when the client socket cannot be inserted."""
    client_slot, backend_slot = path.free.pop(), path.free.pop()
    path.arm(client_slot, backend_slot)
    path.arm(backend_slot, client_slot)
    try:
        key = path.insert(client_sock, client_slot)
    except OSError as err:  # e.g. EOPNOTSUPP: the client already sent FIN
        path.free += [backend_slot, client_slot]
        _Fallbacks.note(f"client socket not inserted: {err}")
        return None
    # the client's comes from the listening socket; a small reply must not wait on Nagle
    backend_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    relay = KernelRelay(loop, path, client_sock, backend_sock, conn)
    relay.keys.append((key, client_slot))
    relay.to_backend.slot, relay.to_client.slot = client_slot, backend_slot
    path.relays.add(relay)
    return relay


def make_start(
    fallback: StartRelay,
    path_for: Callable[[asyncio.AbstractEventLoop], KernelPath | None] | None = None,
    handover: Handover = HANDOVER,
) -> StartRelay:
    """The ``start`` of the kernel relay; connections it cannot take go to ``fallback``.

    ``path_for(loop)`` gives the loop's :class:`KernelPath` (default: one per loop, made on
    first use, the self-tested one first). ``handover`` says when a connection leaves the splice
    relay for the kernel (:data:`AT_ONCE`: right after the PROXY header).
    """
    get_path = _path_for if path_for is None else path_for
    at_once = handover.at_once or not splice.available()

    def start_kernel_relay(
        loop: asyncio.AbstractEventLoop,
        client_sock: Socket,
        backend_sock: Socket,
        first: bytes,
        conn: RelayConn,
    ) -> Relay:
        path = get_path(loop)
        if path is None or len(path.free) < 2:
            if path is not None:
                _Fallbacks.note("every slot of the kernel path is taken")
            return fallback(loop, client_sock, backend_sock, first, conn)
        if not at_once:
            for sock in (client_sock, backend_sock):
                if sock.gettimeout() != 0.0:
                    sock.setblocking(False)
            probation = _Probation(loop, client_sock, backend_sock, conn, path, handover)
            probation.start(first)
            return probation
        sent = 0
        if first:  # the PROXY header goes before any redirected byte
            try:
                sent = backend_sock.send(first)
            except BlockingIOError:
                sent = 0
            except OSError:  # the fallback meets the error itself
                sent = 0
            if sent < len(first):
                return fallback(loop, client_sock, backend_sock, first[sent:], conn)
        relay = _insert(loop, path, client_sock, backend_sock, conn)
        if relay is None:
            return fallback(loop, client_sock, backend_sock, b"", conn)
        relay.to_backend.sent = sent
        path.handed_over += 1
        relay.begin()
        return relay

    return start_kernel_relay


def prepare(
    load: Callable[[], KernelPath] = KernelPath,
    default: StartRelay | None = None,
    handover: Handover = HANDOVER,
) -> StartRelay | None:
    """Load and self-test the kernel path; its ``start``, or None after one log line saying why.

    ``load`` builds the path (passed in so a test can make it fail); ``default`` is the relay
    for connections the path cannot take; ``handover`` says when a connection enters the kernel.
    """
    try:
        path = load()
    except OSError as err:
        _unavailable(_why(err))
        return None
    except Exception as err:  # whatever it is, the default relay serves: say it, once
        _unavailable(f"loading failed: {err!r}")
        return None
    try:
        self_test(path)
    except Exception as err:
        path.close()
        _unavailable(f"self-test failed: {err}")
        return None
    if _SPARE:  # one is enough (a reload to the kernel relay tests it again)
        path.close()
    else:
        _SPARE.append(path)
    if default is None:
        from l4lb.balancer.relay_contract import default_relay

        default = default_relay()
    return make_start(default, handover=handover)


def _why(err: OSError) -> str:
    if err.errno == errno.EPERM:
        return f"{err} (needs CAP_BPF and CAP_NET_ADMIN, or root)"
    if err.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return f"{err} (needs Linux >= 5.13 with BPF sockmap support; this is {os.uname().release})"
    return str(err)


def _unavailable(reason: str) -> None:
    from l4lb.balancer import splice

    using = "splice" if splice.available() else "stream"
    log.warning("event=kernel_relay_unavailable reason=%r using=%s", reason, using)
