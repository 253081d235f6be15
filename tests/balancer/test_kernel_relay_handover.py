"""The kernel relay's hand-over: a ``relay = "kernel"`` connection starts on the splice relay and
goes into the sockmap only once it has proved long-lived (:class:`kernel_relay.Handover`), at a
moment when nothing of it waits in a pipe or a buffer.

Short connections must never be inserted (they would pay the insertion for nothing); long ones
must be, and the bytes around the hand-over must stay exact and in order both ways, also when
both directions are moving at that moment.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading

import pytest

from l4lb.balancer import splice
from l4lb.balancer.kernel_path import STALE, WORDS
from l4lb.balancer.kernel_relay import HANDOVER, Handover, KernelRelay
from tests.balancer.kernel_support import (
    digest_until_eof,
    needs_kernel_path,
    recv_exactly,
    retransmit_overlapping,
    rig,
)
from tests.support.peers import wait_for

pytestmark = needs_kernel_path

MB = 1 << 20
HDR = b"HDR\r\n"


def _exchange(r: object, i: int) -> tuple[int, int]:
    """One request and its answer through the relay; their sizes."""
    req = b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n%03d" % i
    r.client.sendall(req)  # type: ignore[attr-defined]
    want = (HDR if i == 0 else b"") + req
    assert recv_exactly(r.backend, len(want)) == want  # type: ignore[attr-defined]
    r.backend.sendall(answer)  # type: ignore[attr-defined]
    assert recv_exactly(r.client, len(answer)) == answer  # type: ignore[attr-defined]
    return len(req), len(answer)


def _close_client_first(r: object) -> None:
    r.client.shutdown(socket.SHUT_WR)  # type: ignore[attr-defined]
    assert r.backend.recv(1) == b""  # type: ignore[attr-defined]
    r.backend.shutdown(socket.SHUT_WR)  # type: ignore[attr-defined]
    assert r.client.recv(1) == b""  # type: ignore[attr-defined]
    assert r.conn.done.wait(10)  # type: ignore[attr-defined]


def test_a_short_connection_is_never_inserted() -> None:
    """Two exchanges (a TLS 1.2 handshake and one request make as many), then FINs: splice only."""
    with rig(handover=HANDOVER) as r:
        assert isinstance(r.relay, splice.SpliceRelay)
        up = down = 0
        for i in range(HANDOVER.exchanges - 1):
            a, b = _exchange(r, i)
            up, down = up + a, down + b
        _close_client_first(r)
        assert r.conn.reasons == ["client_closed"]
        assert (r.conn.bytes_from_client, r.conn.bytes_to_client) == (up, down)
        assert r.path.handed_over == 0
        assert len(r.path.free) == r.path.capacity  # no slot was ever taken
        assert getattr(r.relay, "kernel", None) is None


def test_a_long_connection_is_inserted_after_its_exchanges() -> None:
    with rig(handover=HANDOVER) as r:
        up = down = 0
        for i in range(HANDOVER.exchanges):
            a, b = _exchange(r, i)
            up, down = up + a, down + b
        assert r.path.handed_over == 0  # the third answer went back; still splice
        a, b = _exchange(r, HANDOVER.exchanges)  # the client speaks again: handed over
        up, down = up + a, down + b
        assert wait_for(lambda: r.path.handed_over == 1)
        kernel = getattr(r.relay, "kernel", None)
        assert isinstance(kernel, KernelRelay)
        for i in range(HANDOVER.exchanges + 1, HANDOVER.exchanges + 6):
            a, b = _exchange(r, i)
            up, down = up + a, down + b
        # the exchanges after the hand-over went through the kernel, not this process
        assert kernel.to_backend.redirected() > 0
        assert kernel.to_client.redirected() > 0
        _close_client_first(r)
        assert r.conn.reasons == ["client_closed"]
        assert (r.conn.bytes_from_client, r.conn.bytes_to_client) == (up, down)
        assert r.path.handed_over == 1
        wait_for(lambda: len(r.path.free) == r.path.capacity)
        assert len(r.path.free) == r.path.capacity  # both slots back after the close


def test_a_connection_that_only_streams_is_handed_over_by_age() -> None:
    """One request, then the backend streams (no exchanges): handed over once it is old enough."""
    with rig(handover=Handover(exchanges=1 << 30, age=0.05)) as r:
        r.client.sendall(b"subscribe\n")
        assert recv_exactly(r.backend, 15) == HDR + b"subscribe\n"
        sent = 0
        while r.path.handed_over == 0:  # ticks until the relay has handed the pair over
            r.backend.sendall(b"tick\n")
            sent += 5
            assert recv_exactly(r.client, 5) == b"tick\n"
            assert sent < 10 * MB, "never handed over"
        for _ in range(20):
            r.backend.sendall(b"tick\n")
            sent += 5
            assert recv_exactly(r.client, 5) == b"tick\n"
        kernel = getattr(r.relay, "kernel", None)
        assert isinstance(kernel, KernelRelay)
        assert kernel.to_client.redirected() > 0
        r.backend.shutdown(socket.SHUT_WR)
        assert r.client.recv(1) == b""
        r.client.shutdown(socket.SHUT_WR)
        assert r.backend.recv(1) == b""
        assert r.conn.done.wait(10)
        assert r.conn.reasons == ["backend_closed"]
        assert (r.conn.bytes_from_client, r.conn.bytes_to_client) == (10, sent)


@pytest.mark.parametrize("run", range(3))
def test_a_hand_over_while_bytes_flow_both_ways_is_byte_exact(run: int) -> None:
    """Both sides send 1400-byte messages without pause. One message each way first, then both
    streams at once: the client's next bytes after the backend's make the exchange that hands
    the pair over, in the middle of both streams, with bytes in the sockets' queues and arriving
    during the insertion. (Saturated bulk with larger writes is rarely idle: it stays on
    splice.)"""
    chunk = 1400
    up, down = os.urandom(16 * MB), os.urandom(48 * MB)
    with rig(handover=Handover(exchanges=1, age=3600.0)) as r:
        r.client.sendall(up[:chunk])
        assert recv_exactly(r.backend, len(HDR) + chunk) == HDR + up[:chunk]
        r.backend.sendall(down[:chunk])
        assert recv_exactly(r.client, chunk) == down[:chunk]
        got: dict[str, tuple[int, str]] = {}
        readers = [
            threading.Thread(target=lambda: got.setdefault("backend", digest_until_eof(r.backend))),
            threading.Thread(target=lambda: got.setdefault("client", digest_until_eof(r.client))),
        ]

        def send(sock: socket.socket, data: bytes) -> None:
            view = memoryview(data)
            for i in range(chunk, len(data), chunk):
                sock.sendall(view[i : i + chunk])
            sock.shutdown(socket.SHUT_WR)

        writers = [
            threading.Thread(target=send, args=(r.backend, down)),
            threading.Thread(target=send, args=(r.client, up)),
        ]
        for t in readers + writers:
            t.start()
        for t in readers + writers:
            t.join(120)
        rest_up, rest_down = up[chunk:], down[chunk:]
        assert got["backend"] == (len(rest_up), hashlib.sha256(rest_up).hexdigest())
        assert got["client"] == (len(rest_down), hashlib.sha256(rest_down).hexdigest())
        assert r.conn.done.wait(10)
        assert (r.conn.bytes_from_client, r.conn.bytes_to_client) == (len(up), len(down))
        assert r.path.handed_over == 1
        at = getattr(r.relay, "handed_at", None)
        assert at is not None
        # in the middle of both streams: splice carried some of each, the kernel relay the rest
        assert chunk < at[0] < len(up) and chunk <= at[1] < len(down), at
        kernel = getattr(r.relay, "kernel", None)
        assert isinstance(kernel, KernelRelay)
        for d in (kernel.to_backend, kernel.to_client):
            assert d.redirected() > 0


def test_a_retransmission_overlapping_bytes_splice_read_is_relayed_once() -> None:
    """The first skb after the hand-over can be a retransmission (late ACKs) that starts in bytes
    splice had already read and relayed: TCP queues it whole, and the program, with no byte of
    the socket seen yet, had nothing to compare its start with, so the old bytes went out again.
    The insertion now tells the program where the socket's unread bytes start. Made on purpose
    with a raw socket, the same every run."""
    old, new, rest = os.urandom(3000), os.urandom(2000), os.urandom(MB)
    with rig(handover=Handover(exchanges=1, age=3600.0)) as r:
        r.client.sendall(b"one")
        assert recv_exactly(r.backend, len(HDR) + 3) == HDR + b"one"
        r.backend.sendall(old)  # relayed by splice, before the insertion
        assert recv_exactly(r.client, len(old)) == old
        r.client.sendall(b"two")  # speaks again after an answer: handed over
        assert recv_exactly(r.backend, 3) == b"two"
        assert wait_for(lambda: r.path.handed_over == 1)
        kernel = getattr(r.relay, "kernel", None)
        assert isinstance(kernel, KernelRelay)
        retransmit_overlapping(r.backend, old[-1000:], new)
        assert recv_exactly(r.client, len(new)) == new  # not old[-1000:] again
        r.backend.sendall(new + rest)  # TCP drops this copy of ``new`` itself
        r.backend.shutdown(socket.SHUT_WR)
        assert digest_until_eof(r.client) == (len(rest), hashlib.sha256(rest).hexdigest())
        d = kernel.to_client
        assert r.path.state[d.slot * WORDS + STALE] in (1000, 3000)
        assert d.redirected() > 0
