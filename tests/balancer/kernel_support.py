"""Whether this machine can run the kernel relay, and a rig to drive the relay on its own: shared by
the kernel relay's test files."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from l4lb.balancer import bpf, kernel_relay
from l4lb.balancer.kernel_path import KernelPath
from l4lb.balancer.kernel_relay import AT_ONCE, Handover, KernelRelay
from l4lb.balancer.relay_contract import EndReason, Relay, default_relay
from tests.balancer.helpers import new_loop, tcp_pair


def _kernel_path_or_reason() -> str | None:
    try:
        path = KernelPath(slots=64)
    except OSError as err:
        return f"the kernel relay cannot load here: {err}"
    path.close()
    return None


UNAVAILABLE = _kernel_path_or_reason()
"""Why the kernel relay cannot load here, or None when it can."""

needs_kernel_path = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")


@dataclass
class Conn:
    bytes_from_client: int = 0
    bytes_to_client: int = 0
    reasons: list[str] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def relay_closed(self, reason: str) -> None:
        self.reasons.append(reason)
        self.done.set()


@dataclass
class Rig:
    client: socket.socket
    backend: socket.socket
    conn: Conn
    relay: Relay
    path: KernelPath
    loop: asyncio.AbstractEventLoop

    def redirected(self, to_client: bool) -> int:
        """Bytes the program redirected in that direction."""
        assert isinstance(self.relay, KernelRelay)
        d = self.relay.to_client if to_client else self.relay.to_backend
        return d.redirected()

    def on_loop(self, fn: object) -> object:
        """Run ``fn()`` on the relay's loop and return its result."""
        out: list[object] = []
        done = threading.Event()

        def call() -> None:
            out.append(fn())  # type: ignore[operator]
            done.set()

        self.loop.call_soon_threadsafe(call)
        assert done.wait(10)
        return out[0]


@contextlib.contextmanager
def rig(
    first: bytes = b"HDR\r\n",
    before: object = None,
    limit: int = kernel_relay.BACKLOG_LIMIT,
    handover: Handover = AT_ONCE,
) -> Iterator[Rig]:
    """A relay between a test client and a test backend; ``before(client, backend)`` runs
    before the relay starts (bytes or a FIN that must be there before the insertion).
    ``handover``: when the connection leaves the splice relay (default: no splice phase)."""
    client, relay_client = tcp_pair()
    relay_backend, backend = tcp_pair()
    for s in (client, backend):
        s.settimeout(15)
    for s in (relay_client, relay_backend):
        s.setblocking(False)
    if before is not None:
        before(client, backend)  # type: ignore[operator]
    loop = new_loop()
    path = KernelPath(slots=64, limit=limit)
    conn = Conn()
    made: list[Relay] = []
    ready = threading.Event()

    def path_for(_: asyncio.AbstractEventLoop) -> KernelPath:
        return path

    start = kernel_relay.make_start(default_relay(), path_for, handover)

    def begin() -> None:
        path.bind(loop)
        made.append(start(loop, relay_client, relay_backend, first, conn))  # type: ignore[arg-type]
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    loop.call_soon_threadsafe(begin)
    assert ready.wait(10)
    try:
        yield Rig(client, backend, conn, made[0], path, loop)
    finally:
        loop.call_soon_threadsafe(made[0].close, EndReason.SHUTDOWN)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        path.close()
        client.close()
        backend.close()


def recv_exactly(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(min(1 << 16, n - len(out)))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


def digest_until_eof(s: socket.socket) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    while chunk := s.recv(1 << 18):
        h.update(chunk)
        n += len(chunk)
    return n, h.hexdigest()


def recv_until_eof(s: socket.socket) -> bytes:
    out = bytearray()
    while chunk := s.recv(1 << 18):
        out += chunk
    return bytes(out)


def difference(got: bytes, want: bytes) -> str:
    """Where ``got`` first differs from ``want`` and what came there instead ("" when equal):
    a stream that repeats a segment says which bytes came again, and how many."""
    if got == want:
        return ""
    at = next(
        (
            i
            for i in range(0, min(len(got), len(want)), 4096)
            if got[i : i + 4096] != want[i : i + 4096]
        ),
        None,
    )
    if at is None:
        at = min(len(got), len(want))
    else:
        at += next(k for k in range(4096) if got[at + k : at + k + 1] != want[at + k : at + k + 1])
    line = f"{len(got)} bytes for {len(want)}; the first wrong byte at offset {at}"
    probe = got[at : at + 64]
    if len(probe) == 64:
        source = want.rfind(probe, 0, at + 1)
        if source < 0:
            source = want.find(probe, at)
        if source >= 0:
            line += f": bytes sent at offset {source} came there ({at - source:+d})"
        else:
            line += ": bytes that were never sent came there"
    return line


def tcp_counters(sock: socket.socket) -> dict[str, int]:
    """What TCP itself resent on ``sock`` (``tcp_info``: bytes_retrans, total_retrans)."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 216)
    return {
        "total_retrans": struct.unpack_from("<I", raw, 100)[0],
        "bytes_retrans": struct.unpack_from("<Q", raw, 208)[0],
    }


def _process_tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
    return out


def _count_keys(map_id: int) -> int:
    fd = bpf.map_fd_by_id(map_id)
    try:
        return len(bpf.map_keys(fd, 8))
    finally:
        os.close(fd)


def sockets_in_the_map(pid: int) -> int:
    """Sockets that process ``pid`` (or a child: its workers) has handed to the kernel now: the
    elements of each of its kernel relay cookie -> slot hashes (``l4lb_slots``)."""
    seen: set[int] = set()
    total = 0
    for p in _process_tree(pid):
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{p}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if "bpf-map" not in os.readlink(fd):
                        continue
                    info = dict(
                        line.split(":\t", 1)
                        for line in Path(f"/proc/{p}/fdinfo/{fd.name}").read_text().splitlines()
                        if ":\t" in line
                    )
                    shape = (info.get("map_type"), info.get("key_size"), info.get("value_size"))
                    map_id = int(info.get("map_id", "0"))
                    # BPF_MAP_TYPE_HASH, cookie -> slot; once per map (fork shares them)
                    if shape == ("1", "8", "4") and map_id not in seen:
                        seen.add(map_id)
                        total += _count_keys(map_id)
    return total


TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ = 19, 20, 21
TCP_RECV_QUEUE, TCP_SEND_QUEUE = 1, 2


def _sequence_numbers(sock: socket.socket) -> tuple[int, int]:
    """(the next sequence number ``sock`` sends, the next it expects), read in repair mode."""
    seqs = []
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    try:
        for queue in (TCP_SEND_QUEUE, TCP_RECV_QUEUE):
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
            seqs.append(
                struct.unpack("<I", sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, 4))[0]
            )
    finally:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 0)
    return seqs[0], seqs[1]


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def retransmit_overlapping(sender: socket.socket, old: bytes, new: bytes) -> None:
    """Send, as ``sender`` would retransmit them, the last ``old`` bytes it sent followed by
    ``new`` bytes it has not sent yet: one segment that starts before what its peer has received
    and ends after it (what a retransmission after lost or late ACKs can be, when TCP merges
    segments). A raw socket on loopback; ``sender`` sends ``new`` itself afterwards (its peer
    then drops that copy as a plain duplicate)."""
    src, dst = sender.getsockname(), sender.getpeername()
    snd_nxt, rcv_nxt = _sequence_numbers(sender)
    payload = old + new
    header = struct.pack(
        "!HHIIBBHHH",
        src[1], dst[1], (snd_nxt - len(old)) & 0xFFFFFFFF, rcv_nxt,
        5 << 4, 0x18, 65535, 0, 0,  # ACK | PSH, no options
    )  # fmt: skip
    pseudo = socket.inet_aton(src[0]) + socket.inet_aton(dst[0])
    pseudo += struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(header) + len(payload))
    checksum = _checksum(pseudo + header + payload)
    header = header[:16] + struct.pack("!H", checksum) + header[18:]
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as raw:
        raw.sendto(header + payload, (dst[0], 0))
