"""The kernel relay's per-worker part: the maps, the verdict program and the start-up self-test.

See :mod:`l4lb.balancer.kernel_relay` for what the program does and why; this module builds it
(:func:`program`, assembled with :mod:`l4lb.balancer.bpf`), holds the maps of one worker
(:class:`KernelPath`: slots, the sockmap, the ``mmap``-ed state array, the ring buffer) and
checks all of it on loopback sockets before the worker uses it (:func:`self_test`).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import mmap
import os
import select
import socket
import struct
import time
import weakref
from typing import Protocol

from l4lb.balancer import bpf, poller
from l4lb.balancer.poller import EPOLLET, EPOLLIN
from l4lb.balancer.relay_contract import Socket

__all__ = [
    "BACKLOG_LIMIT",
    "KernelPath",
    "SelfTestError",
    "program",
    "self_test",
    "written",
]

BACKLOG_LIMIT = 4 << 20
"""Redirected bytes a direction may have queued for its destination before it is handed back."""
SLOTS = 1 << 16
"""Sockets one worker can hand to the kernel (two per connection); past that, the default relay."""
RING_SIZE = 1 << 16

# state[slot], u64 words, for the slot's socket as a source:
#   redirected  bytes the program redirected to the peer (program)
#   passed      bytes the program passed to this process (program)
#   armed       ``passed`` when the program last went back to redirecting (program; NEVER: never)
#   credit      ``redirected`` may grow to this (program when it re-arms; this process, larger)
#   asked       1: the program asked for more credit (program sets, this process clears)
#   peer        the peer socket's slot (this process)
#   copied      passed bytes this process has read and written on (this process)
#   want        0: never redirect again (this process; a peer that could not be inserted)
#   next        the TCP sequence number after the last byte the program saw, | 1 << 32 (program;
#               at the insertion: where the socket's unread bytes start, :func:`unread_from`;
#               0: unknown)
#   stale       bytes the program cut from skbs because the socket had delivered them before
#               (program; a retransmission that overlaps what came before: see :func:`program`)
REDIRECTED, PASSED, ARMED, CREDIT, ASKED, PEER, COPIED, WANT, NEXT, STALE = range(10)
WORDS = 10
VALUE = 8 * WORDS
NEVER = (1 << 64) - 1
"""``armed`` that no ``passed`` count reaches: the direction stays with this process."""

SO_COOKIE = getattr(socket, "SO_COOKIE", 57)
SIOCOUTQ = 0x5411
TCP_INFO_SIZE = 136
BYTES_ACKED = 120
SK_PASS = 1
SKB_CB_SEQ, SKB_CB_END_SEQ = 48, 52
"""``__sk_buff.cb[0]`` and ``cb[1]``: for an SK_SKB program, the skb's TCP sequence numbers."""
TRIM_STEP = 0xFFF
"""The most ``bpf_skb_adjust_room`` cuts from an SK_SKB skb's head in one call."""
TRIM_CALLS = 64
"""Calls the program makes at most to cut one skb's old head (``TRIM_CALLS * TRIM_STEP`` bytes)."""
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_RECV_QUEUE = 19, 20, 21, 1
TCP_REPAIR_OFF_NO_WP = -1  # leave repair mode without sending the peer a window probe (4.19+)
SIOCINQ = 0x541B


class SelfTestError(Exception):
    """The start-up self-test relayed something other than what it sent."""


class SlotOwner(Protocol):
    """A direction of a relayed connection, named by its source socket's slot."""

    def ring_posted(self) -> None:
        """The program posted this slot to the ring (it switched the direction, or asks)."""


class Refreshable(Protocol):
    closed: bool

    def refresh(self) -> None: ...


def written(sock: Socket, connected: bool) -> int:
    """Bytes ever written into ``sock``'s send queue: ``tcp_info.bytes_acked + SIOCOUTQ``.

    A connected socket's ``bytes_acked`` counts its SYN. ``bytes_acked`` is read first: bytes
    acked between the two calls only make the sum smaller, never larger.
    """
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    acked = struct.unpack_from("<Q", info, BYTES_ACKED)[0] - (1 if connected else 0)
    queued = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), SIOCOUTQ, queued)
    return int(acked + queued[0])


def unread_from(sock: Socket) -> int | None:
    """The TCP sequence number of the first byte ``sock`` has received and nobody has read yet
    (the kernel's ``copied_seq``), or None when the socket will not say (no CAP_NET_ADMIN).

    ``rcv_nxt`` read in repair mode (``TCP_QUEUE_SEQ`` of the receive queue; repair mode changes
    nothing else of a socket that no one writes to meanwhile) less the bytes queued unread
    (``SIOCINQ``: valid before the socket is in the sockmap). Read again until a packet arriving
    in between did not move ``rcv_nxt``.
    """
    level = socket.IPPROTO_TCP
    count = array.array("i", [0])
    for _ in range(4):
        try:
            sock.setsockopt(level, TCP_REPAIR, 1)
        except OSError:
            return None
        try:
            sock.setsockopt(level, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
            before = sock.getsockopt(level, TCP_QUEUE_SEQ)
            fcntl.ioctl(sock.fileno(), SIOCINQ, count)
            after = sock.getsockopt(level, TCP_QUEUE_SEQ)
        except OSError:
            return None
        finally:
            sock.setsockopt(level, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
        if before == after:
            return (after - count[0]) & 0xFFFFFFFF
    return None


# -- the program -----------------------------------------------------------------------------


def program(slots: int, state: int, socks: int, ring: int, limit: int) -> bytes:
    """The verdict program (see the module docstring), given the four maps' descriptors."""
    a = bpf.Asm()

    def notify() -> None:  # post this socket's slot (r8) to the ring
        a.store(8, 10, -24, 8)
        a.load_map(1, ring)
        a.mov(2, 10)
        a.add_imm(2, -24)
        a.mov_imm(3, 8)
        a.mov_imm(4, 0)
        a.call(bpf.RINGBUF_OUTPUT_FN)

    a.mov(6, 1)  # r6 = skb
    a.load(4, 7, 6, 0)  # r7 = skb->len
    a.jump_if(7, "==", 0, "drop")  # a 0-byte skb (a FIN) would break the peer: drop it
    a.mov(1, 6)
    a.call(bpf.GET_SOCKET_COOKIE_FN)
    a.store(8, 10, -8, 0)
    a.mov(2, 10)
    a.add_imm(2, -8)
    a.load_map(1, slots)
    a.call(bpf.MAP_LOOKUP_ELEM_FN)
    a.jump_if(0, "==", 0, "pass_plain")  # not one of ours
    a.load(4, 8, 0, 0)  # r8 = slot
    a.store(4, 10, -16, 8)
    a.mov(2, 10)
    a.add_imm(2, -16)
    a.load_map(1, state)
    a.call(bpf.MAP_LOOKUP_ELEM_FN)
    a.jump_if(0, "==", 0, "pass_plain")
    a.mov(9, 0)  # r9 = &state[slot]
    # A retransmitted segment that overlaps bytes the socket already received is queued whole
    # (TCP readers skip the old part by sequence number; the sockmap's read_skb does not), so
    # the program would move those bytes twice. Cut the old part first (drop a wholly old skb).
    a.load(4, 1, 6, SKB_CB_SEQ)
    a.load(4, 2, 6, SKB_CB_END_SEQ)
    a.mov32(4, 2)
    a.sub(4, 1)
    a.mov32(4, 4)  # end_seq - seq: len, or len + 1 with a FIN; else cb is not TCP's (a kernel
    a.jump_if_reg(4, "==", 7, "seq_ok")  # that maps it elsewhere): leave the skb alone
    a.add_imm(4, -1)
    a.jump_if_reg(4, "!=", 7, "no_seq")
    a.label("seq_ok")
    a.load(8, 3, 9, 8 * NEXT)
    a.jump_if(3, "==", 0, "fresh")  # the first skb since the insertion
    a.mov32(3, 3)
    a.mov32(4, 2)
    a.sub(4, 3)
    a.mov32(4, 4)  # end_seq - next (mod 2**32)
    a.jump_if(4, "==", 0, "stale_all")
    a.rsh_imm(4, 31)
    a.jump_if(4, "!=", 0, "stale_all")  # ends at or before next: every byte is old
    a.mov32(4, 3)
    a.sub(4, 1)
    a.mov32(4, 4)  # next - seq (mod 2**32): the old bytes at the head
    a.jump_if(4, "==", 0, "fresh")
    a.mov(5, 4)
    a.rsh_imm(5, 31)
    a.jump_if(5, "!=", 0, "fresh")  # starts after next (not expected): nothing to cut
    a.load(8, 5, 9, 8 * STALE)
    a.add(5, 4)
    a.store(8, 9, 8 * STALE, 5)
    a.store(8, 10, -32, 4)  # old bytes left to cut
    a.mov_imm(5, 0)
    a.store(8, 10, -40, 5)  # calls made
    a.label("trim")
    a.load(8, 4, 10, -32)
    a.jump_if(4, "==", 0, "trimmed")
    a.load(8, 5, 10, -40)
    a.jump_if(5, ">=", TRIM_CALLS, "trimmed")
    a.add_imm(5, 1)
    a.store(8, 10, -40, 5)
    a.mov(2, 4)
    a.jump_if(2, "<=", TRIM_STEP, "step")
    a.mov_imm(2, TRIM_STEP)
    a.label("step")
    a.store(8, 10, -48, 2)  # this call's step
    a.mov_imm(3, 0)
    a.sub(3, 2)
    a.mov(2, 3)  # -step
    a.mov(1, 6)
    a.mov_imm(3, 0)
    a.mov_imm(4, 0)
    a.call(bpf.SKB_ADJUST_ROOM_FN)
    a.jump_if(0, "!=", 0, "trimmed")
    a.load(8, 4, 10, -32)
    a.load(8, 2, 10, -48)
    a.sub(4, 2)
    a.store(8, 10, -32, 4)  # cut: that many fewer left
    a.jump("trim")
    a.label("trimmed")
    # ``stale`` counted every old byte; take back those left uncut (the call limit, or a
    # refused call): they go out again, and the count says so by not covering them
    a.load(8, 4, 10, -32)
    a.load(8, 5, 9, 8 * STALE)
    a.sub(5, 4)
    a.store(8, 9, 8 * STALE, 5)
    a.load(4, 7, 6, 0)  # r7 = the new skb->len
    a.load(4, 2, 6, SKB_CB_END_SEQ)
    a.label("fresh")
    a.mov_imm(3, 1)
    a.lsh_imm(3, 32)
    a.add(2, 3)
    a.store(8, 9, 8 * NEXT, 2)  # next = end_seq | 1 << 32
    a.label("no_seq")
    a.jump_if(7, "==", 0, "drop")
    a.load(8, 1, 9, 8 * PASSED)
    a.load(8, 2, 9, 8 * ARMED)
    a.jump_if_reg(1, "==", 2, "kernel")
    # user mode: back to the kernel once the process has written on every byte passed to it
    a.load(8, 3, 9, 8 * WANT)
    a.jump_if(3, "==", 0, "pass")
    a.load(8, 3, 9, 8 * COPIED)
    a.jump_if_reg(3, "!=", 1, "pass")
    a.store(8, 9, 8 * ARMED, 1)  # armed = passed
    a.load(8, 2, 9, 8 * REDIRECTED)
    a.add_imm(2, limit)
    a.store(8, 9, 8 * CREDIT, 2)  # the destination took every redirected byte: a new credit
    notify()
    a.label("kernel")
    a.load(8, 1, 9, 8 * REDIRECTED)
    a.add(1, 7)
    a.load(8, 2, 9, 8 * CREDIT)
    a.jump_if_reg(1, ">", 2, "hand_back")  # the destination's backlog is full
    a.add_imm(2, -(limit - limit // 4))
    a.jump_if_reg(1, "<=", 2, "redirect")
    a.load(8, 3, 9, 8 * ASKED)  # a quarter of the credit used: ask the process for more, once
    a.jump_if(3, "!=", 0, "redirect")
    a.mov_imm(3, 1)
    a.store(8, 9, 8 * ASKED, 3)
    notify()
    a.label("redirect")
    a.load(4, 3, 9, 8 * PEER)
    a.mov(1, 6)
    a.load_map(2, socks)
    a.mov_imm(4, 0)  # to the peer's egress
    a.call(bpf.SK_REDIRECT_MAP_FN)
    a.jump_if(0, "!=", SK_PASS, "hand_back")  # the peer is not in the map (yet)
    a.load(8, 1, 9, 8 * REDIRECTED)
    a.add(1, 7)
    a.store(8, 9, 8 * REDIRECTED, 1)
    a.mov_imm(0, SK_PASS)
    a.exit()
    a.label("hand_back")  # the first byte the process must read: say which slot
    notify()
    a.label("pass")
    a.load(8, 1, 9, 8 * PASSED)
    a.add(1, 7)
    a.store(8, 9, 8 * PASSED, 1)
    a.label("pass_plain")
    a.mov_imm(0, SK_PASS)
    a.exit()
    a.label("stale_all")
    a.load(8, 5, 9, 8 * STALE)
    a.add(5, 7)
    a.store(8, 9, 8 * STALE, 5)
    a.label("drop")
    a.mov_imm(0, 0)
    a.exit()
    return a.assemble()


class KernelPath:
    """The maps and the attached program of one worker, and which direction owns each slot."""

    def __init__(self, slots: int = SLOTS, limit: int = BACKLOG_LIMIT) -> None:
        self.limit = limit
        self.capacity = slots
        self.fds: list[int] = []
        self._maps: list[mmap.mmap] = []
        self._loop: weakref.ref[asyncio.AbstractEventLoop] | None = None
        try:
            self.slots_fd = self._map(bpf.MAP_HASH, 8, 4, slots, bpf.F_NO_PREALLOC, "l4lb_slots")
            self.state_fd = self._map(bpf.MAP_ARRAY, 4, VALUE, slots, bpf.F_MMAPABLE, "l4lb_state")
            self.socks_fd = self._map(bpf.MAP_SOCKMAP, 4, 4, slots, 0, "l4lb_socks")
            self.ring_fd = self._map(bpf.MAP_RINGBUF, 0, 0, RING_SIZE, 0, "l4lb_ring")
            code = program(self.slots_fd, self.state_fd, self.socks_fd, self.ring_fd, limit)
            prog = bpf.prog_load(bpf.PROG_SK_SKB, code, bpf.ATTACH_SK_SKB_VERDICT, "l4lb_relay")
            self.fds.append(prog)
            bpf.prog_attach(self.socks_fd, prog, bpf.ATTACH_SK_SKB_VERDICT)
            page = mmap.PAGESIZE
            size = -(-VALUE * slots // page) * page
            state_map = bpf.map_mmap(self.state_fd, size)
            cons = bpf.map_mmap(self.ring_fd, page)
            prod = bpf.map_mmap(self.ring_fd, page + 2 * RING_SIZE, writable=False, offset=page)
        except BaseException:
            self.close()
            raise
        self._maps += [state_map, cons, prod]
        self.state = memoryview(state_map).cast("Q")
        self._cons = memoryview(cons).cast("Q")
        self._prod = memoryview(prod)
        self._ring_data = page
        self.free = list(range(slots - 1, -1, -1))
        self.owners: dict[int, SlotOwner] = {}
        self.relays: set[Refreshable] = set()
        """The relays using this path (each takes itself out when it closes)."""
        self.handed_over = 0
        """Connections whose sockets went into the map (the relay's own count)."""

    def _map(self, kind: int, key: int, value: int, entries: int, flags: int, name: str) -> int:
        fd = bpf.map_create(kind, key, value, entries, flags, name)
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        """Release the maps and the program (sockets still in the map are left alone)."""
        loop = self._loop() if self._loop is not None else None
        if loop is not None and not loop.is_closed():
            poller.for_loop(loop).forget(self.ring_fd)
        for view in ("state", "_cons", "_prod"):
            with contextlib.suppress(AttributeError):
                getattr(self, view).release()
        for m in self._maps:
            m.close()
        self._maps.clear()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch the ring buffer from ``loop``'s poller (once)."""
        self._loop = weakref.ref(loop)
        poller.for_loop(loop).watch(self.ring_fd, self, EPOLLIN | EPOLLET)

    # -- slots -------------------------------------------------------------------------------

    def arm(self, slot: int, peer: int) -> None:
        """Fresh counters for ``slot`` (not in the sockmap), redirecting to ``peer``."""
        base = slot * WORDS
        st = self.state
        st[base + REDIRECTED] = 0
        st[base + PASSED] = 0
        st[base + ARMED] = 0
        st[base + CREDIT] = self.limit
        st[base + ASKED] = 0
        st[base + PEER] = peer
        st[base + COPIED] = 0
        st[base + WANT] = 1
        st[base + NEXT] = 0
        st[base + STALE] = 0

    def insert(self, sock: Socket, slot: int) -> bytes:
        """Name ``sock``'s slot to the program, then put it in the sockmap; the cookie key.

        The program learns where the socket's unread bytes start (``next``): its first skb can
        be a retransmission that overlaps bytes read before the insertion (by splice before a
        hand-over), and only that number says which of its bytes are old.
        """
        start = unread_from(sock)
        if start is not None:
            self.state[slot * WORDS + NEXT] = start | 1 << 32
        key = sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)
        bpf.map_update(self.slots_fd, key, struct.pack("<I", slot))
        try:
            bpf.map_update(self.socks_fd, struct.pack("<I", slot), struct.pack("<I", sock.fileno()))
        except bpf.BpfError:
            bpf.map_delete(self.slots_fd, key)
            raise
        return key

    def release(self, key: bytes | None, slot: int) -> None:
        """Forget a closed socket's cookie (closing it left the sockmap) and free its slot."""
        self.owners.pop(slot, None)
        if key is not None:
            with contextlib.suppress(OSError):
                bpf.map_delete(self.slots_fd, key)
        self.free.append(slot)

    # -- the ring ----------------------------------------------------------------------------

    def event(self, fd: int, events: int) -> None:
        """The ring buffer has records: hand each named direction back to this process."""
        for slot in self.read_ring():
            owner = self.owners.get(slot)
            if owner is not None:
                owner.ring_posted()

    def read_ring(self) -> list[int]:
        """The slots posted since the last read.

        The program wakes the reader only when it posts at the reader's position, so the reader
        stores its position and looks again until nothing new came (as libbpf does): a record
        posted while it read would otherwise wait for the next one.
        """
        cons, prod, data = self._cons, self._prod, self._ring_data
        pos = cons[0]
        mask = RING_SIZE - 1
        slots: list[int] = []
        while True:
            end = struct.unpack_from("<Q", prod, 0)[0]
            if pos >= end:
                return slots
            while pos < end:
                head = struct.unpack_from("<I", prod, data + (pos & mask))[0]
                if head & (1 << 31):  # still being written: its commit wakes us
                    cons[0] = pos
                    return slots
                size = head & ~(3 << 30)
                if not head & (1 << 30):  # not discarded
                    slots.append(struct.unpack_from("<Q", prod, data + ((pos + 8) & mask))[0])
                pos += (size + 8 + 7) & ~7
            cons[0] = pos


# -- the self-test -----------------------------------------------------------------------------


def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        connected = socket.create_connection(listening.getsockname(), timeout=1.0)
        accepted, _ = listening.accept()
    accepted.settimeout(1.0)
    return connected, accepted


def _expect(sock: socket.socket, want: bytes, what: str) -> None:
    got = b""
    deadline = time.monotonic() + 3.0
    while len(got) < len(want) and time.monotonic() < deadline:
        if select.select([sock], [], [], 0.1)[0]:
            chunk = sock.recv(len(want) - len(got))
            if not chunk:
                break
            got += chunk
    if got != want:
        raise SelfTestError(f"{what}: sent {want!r}, got {got!r}")


def self_test(path: KernelPath) -> None:
    """Relay bytes both ways over loopback through ``path``; raise if anything is off.

    Covers what the relay relies on: the insertion, a byte queued before it (pushed by the read
    after it), redirects both ways, the program's counts and sequence numbers, the written-bytes
    sum used for the FIN (on an accepted and a connected socket), and a hand-back with its ring
    record.
    """
    client, lb_c = _pair()
    lb_b, backend = _pair()
    socks = (client, lb_c, lb_b, backend)
    keys: list[tuple[bytes, int]] = []
    try:
        lb_b.sendall(b"HDR:")
        client.sendall(b"ping")
        # queued in lb_c before the insertion (not arriving in between: that is handed back)
        if not select.select([lb_c], [], [], 2.0)[0]:
            raise SelfTestError("loopback bytes did not arrive")
        c, b = path.free.pop(), path.free.pop()
        path.arm(c, b)
        path.arm(b, c)
        for s, slot in ((lb_c, c), (lb_b, b)):
            keys.append((path.insert(s, slot), slot))
        for s in (lb_c, lb_b):
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                data = s.recv(64, socket.MSG_DONTWAIT)
                raise SelfTestError(f"the read after the insertion returned {data!r}")
        _expect(backend, b"HDR:ping", "client to backend")
        backend.sendall(b"pong")
        _expect(client, b"pong", "backend to client")
        st = path.state
        counts = (st[c * WORDS + REDIRECTED], st[b * WORDS + REDIRECTED])
        if counts != (4, 4):
            raise SelfTestError(f"redirected counts {counts}, expected (4, 4)")
        if not (st[c * WORDS + NEXT] and st[b * WORDS + NEXT]):
            # without them a retransmission that overlaps received bytes is relayed twice
            raise SelfTestError("the program cannot read the skbs' TCP sequence numbers")
        for sock, connected, want in ((lb_b, True, 8), (lb_c, False, 4)):
            got = written(sock, connected)
            if got != want:
                raise SelfTestError(f"bytes written by the socket {got}, expected {want}")
        path.read_ring()
        st[c * WORDS + CREDIT] = 0  # the next client byte is handed back
        client.sendall(b"back")
        lb_c.settimeout(3.0)
        back = lb_c.recv(64)
        if back != b"back" or path.read_ring() != [c]:
            raise SelfTestError(f"hand-back: read {back!r}")
    finally:
        for sock in socks:
            sock.close()
        for key, slot in keys:
            path.release(key, slot)
