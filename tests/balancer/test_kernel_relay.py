"""The kernel relay on its own, over real loopback TCP: what the sockmap gets wrong unless the relay
handles it (bytes queued before the insertion, the FIN after a large transfer, a socket that can
no longer be inserted, backpressure with a client that reads nothing).

The relay runs on an event loop in a background thread (uvloop when installed, as in production);
the test plays the client and the backend with plain blocking sockets. Every test checks that the
bytes really went through the kernel (the program's ``redirected`` counts), not a fallback.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading

import pytest

from l4lb.balancer import bpf, kernel_relay, splice
from l4lb.balancer.kernel_path import CREDIT, STALE, WORDS, KernelPath, written
from l4lb.balancer.kernel_relay import KernelRelay
from l4lb.balancer.relay_contract import EndReason
from tests.balancer.kernel_support import (
    Rig,
    difference,
    digest_until_eof,
    needs_kernel_path,
    recv_exactly,
    recv_until_eof,
    retransmit_overlapping,
    rig,
    tcp_counters,
)
from tests.support.peers import wait_for

pytestmark = needs_kernel_path

MB = 1 << 20


def test_bytes_queued_before_the_insertion_come_first_in_order() -> None:
    def before(client: socket.socket, backend: socket.socket) -> None:
        client.sendall(b"early request")  # waits in the relay's client socket
        backend.sendall(b"220 banner\r\n")  # a backend that speaks first

    with rig(before=before) as r:
        assert isinstance(r.relay, KernelRelay)
        assert recv_exactly(r.backend, 18) == b"HDR\r\nearly request"
        assert recv_exactly(r.client, 12) == b"220 banner\r\n"
        r.client.sendall(b"+more")
        assert recv_exactly(r.backend, 5) == b"+more"
        r.backend.sendall(b"+answer")
        assert recv_exactly(r.client, 7) == b"+answer"
        # through the kernel: the program counted them, this process copied none
        assert (r.redirected(False), r.redirected(True)) == (18, 19)
        assert r.relay.to_backend.user_bytes == r.relay.to_client.user_bytes == 0
        r.on_loop(r.relay.refresh)
        assert (r.conn.bytes_from_client, r.conn.bytes_to_client) == (18, 19)


@pytest.mark.parametrize("closer", ["client", "backend"])
def test_fin_follows_a_large_transfer_byte_exact_both_ways(closer: str) -> None:
    up, down = os.urandom(48 * MB), os.urandom(40 * MB)
    with rig() as r:
        assert recv_exactly(r.backend, 5) == b"HDR\r\n"

        def send(sock: socket.socket, data: bytes) -> None:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)  # the FIN right behind the last byte

        first, second = (r.client, r.backend) if closer == "client" else (r.backend, r.client)
        got: dict[str, tuple[int, str]] = {}
        to_backend = threading.Thread(
            target=lambda: got.setdefault("backend", digest_until_eof(r.backend))
        )
        to_client = threading.Thread(
            target=lambda: got.setdefault("client", digest_until_eof(r.client))
        )
        first_peer, second_peer = (
            (to_backend, to_client) if first is r.client else (to_client, to_backend)
        )
        for t in (to_backend, to_client):
            t.start()
        send(first, up if first is r.client else down)
        # The end reason names the direction whose FIN was passed on first: the second side
        # starts sending once the first's FIN has arrived (else, on a busy machine, its bytes
        # can overtake the first's last ones and the reason depends on the scheduler). The
        # second direction still runs while the first is half-closed.
        first_peer.join(60)
        send(second, up if second is r.client else down)
        second_peer.join(60)
        assert got["backend"] == (len(up), hashlib.sha256(up).hexdigest())
        assert got["client"] == (len(down), hashlib.sha256(down).hexdigest())
        assert r.conn.done.wait(10)
        assert r.conn.reasons == [f"{closer}_closed"]
        assert (r.conn.bytes_from_client, r.conn.bytes_to_client) == (len(up), len(down))
        assert isinstance(r.relay, KernelRelay)
        for d, size in ((r.relay.to_backend, len(up)), (r.relay.to_client, len(down))):
            assert d.redirected() > 0  # the kernel carried bytes (and this process the rest)
            assert d.redirected() + d.user_bytes == size


def test_a_client_that_sent_fin_before_the_insertion_falls_back() -> None:
    def before(client: socket.socket, backend: socket.socket) -> None:
        client.sendall(b"whole request")
        client.shutdown(socket.SHUT_WR)
        wait_for(lambda: True)

    def settled(client: socket.socket, backend: socket.socket) -> None:
        before(client, backend)
        # the FIN must have reached the relay's socket (CLOSE_WAIT) before the relay starts
        info = struct.unpack_from("B", client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8))
        assert wait_for(lambda: info is not None)

    with rig(before=settled) as r:
        assert not isinstance(r.relay, KernelRelay)  # the sockmap refuses a CLOSE_WAIT socket
        assert recv_exactly(r.backend, 18) == b"HDR\r\nwhole request"
        assert r.backend.recv(10) == b""  # its FIN follows
        r.backend.sendall(b"reply")
        r.backend.shutdown(socket.SHUT_WR)
        assert recv_exactly(r.client, 5) == b"reply"
        assert r.client.recv(10) == b""
        assert r.conn.done.wait(10)
        assert r.conn.bytes_from_client == 13


def test_a_backend_that_closed_before_the_insertion_is_copied_in_user_mode() -> None:
    def before(client: socket.socket, backend: socket.socket) -> None:
        backend.sendall(b"bye\r\n")
        backend.shutdown(socket.SHUT_WR)

    with rig(before=before) as r:
        assert isinstance(r.relay, KernelRelay)
        assert recv_exactly(r.client, 5) == b"bye\r\n"
        assert r.client.recv(10) == b""
        r.client.sendall(b"still listening?")
        r.client.shutdown(socket.SHUT_WR)
        assert recv_exactly(r.backend, 21) == b"HDR\r\nstill listening?"
        assert r.backend.recv(10) == b""
        assert r.conn.done.wait(10)
        assert (r.conn.bytes_from_client, r.conn.bytes_to_client) == (16, 5)
        assert r.relay.to_client.slot == -1  # the backend never entered the map


def _backlog(r: Rig) -> int:
    """Bytes redirected to the relay's client socket that it has not taken into its send queue."""
    assert isinstance(r.relay, KernelRelay)
    d = r.relay.to_client
    return d.redirected() + d.sent - written(d.dst, connected=False)


def test_a_client_reading_nothing_bounds_what_the_kernel_queues() -> None:
    """Without the credit, the probe saw 256 MiB pile up in the psock for such a client."""
    data = os.urandom(256 * MB)
    with rig(first=b"") as r:
        r.backend.settimeout(1.0)
        pushed = 0
        view = memoryview(data)
        with pytest.raises(TimeoutError):  # the backend's send blocks: flow control works
            while pushed < len(data):
                pushed += r.backend.send(view[pushed : pushed + MB])
        assert isinstance(r.relay, KernelRelay)
        assert r.relay.to_client.user  # handed back to this process, which waits for the client
        assert _backlog(r) <= kernel_relay.BACKLOG_LIMIT
        assert pushed < 96 * MB, pushed  # socket buffers on both hops plus one backlog
        r.backend.settimeout(60)

        def send_rest() -> None:
            r.backend.sendall(view[pushed:])
            r.backend.shutdown(socket.SHUT_WR)  # the end is known: a longer stream shows

        sender = threading.Thread(target=send_rest)
        sender.start()
        got = recv_until_eof(r.client)
        sender.join(30)
        d = r.relay.to_client
        # this once failed under the whole suite's load (a segment twice): say where and how
        assert not difference(got, data), (
            difference(got, data),
            {"stale": r.path.state[d.slot * WORDS + STALE], "user_bytes": d.user_bytes},
            {"backend": tcp_counters(r.backend)},
        )
        assert r.redirected(True) > 0


@pytest.mark.parametrize("way", ["redirected", "handed_back"])
def test_a_retransmission_overlapping_received_bytes_is_relayed_once(way: str) -> None:
    """A segment that starts before what the socket has received (a retransmission after late
    ACKs, merged with new bytes) is queued whole by TCP; the sockmap hands the program the whole
    skb, old bytes included. Seen under load as a destination that got one 65,483-byte segment
    twice; here made on purpose with a raw socket, the same every run."""
    old, new, rest = os.urandom(3000), os.urandom(2000), os.urandom(MB)
    with rig(first=b"") as r:
        r.backend.sendall(old)
        assert recv_exactly(r.client, len(old)) == old
        assert isinstance(r.relay, KernelRelay)
        d = r.relay.to_client
        if way == "handed_back":  # the next skb goes to the process, which copies it
            r.on_loop(lambda: r.path.state.__setitem__(d.slot * WORDS + CREDIT, 0))
        retransmit_overlapping(r.backend, old[-1000:], new)
        assert recv_exactly(r.client, len(new)) == new  # not old[-1000:] again
        r.backend.sendall(new + rest)  # TCP drops this copy of ``new`` itself
        r.backend.shutdown(socket.SHUT_WR)
        assert digest_until_eof(r.client) == (len(rest), hashlib.sha256(rest).hexdigest())
        # the 1,000 old bytes, and ``new`` again at the head of the backend's next segment
        # (which also carries the first bytes of ``rest``), unless TCP sent ``new`` alone
        assert r.path.state[d.slot * WORDS + STALE] in (1000, 3000)
        if way == "handed_back":
            assert d.user_bytes > 0
        else:
            assert d.user_bytes == 0


def test_small_credit_hands_back_often_and_loses_nothing() -> None:
    """A 64 KiB credit: the direction goes back and forth between kernel and process many times."""
    up = os.urandom(32 * MB)
    with rig(limit=64 << 10) as r:
        assert recv_exactly(r.backend, 5) == b"HDR\r\n"
        got: list[tuple[int, str]] = []
        reader = threading.Thread(target=lambda: got.append(digest_until_eof(r.backend)))
        reader.start()
        r.client.sendall(up)
        r.client.shutdown(socket.SHUT_WR)
        reader.join(60)
        assert got == [(len(up), hashlib.sha256(up).hexdigest())]
        assert isinstance(r.relay, KernelRelay)
        d = r.relay.to_backend
        assert 0 < d.redirected() < len(up)  # both ways were used
        assert d.user_bytes > 0
        assert d.redirected() + d.user_bytes == len(up)


def test_a_reset_resets_the_other_side() -> None:
    with rig() as r:
        assert recv_exactly(r.backend, 5) == b"HDR\r\n"
        r.client.sendall(b"x")
        assert r.backend.recv(10) == b"x"
        r.backend.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        r.backend.close()
        assert r.conn.done.wait(5)
        assert r.conn.reasons == ["reset"]
        with pytest.raises(ConnectionResetError):
            while r.client.recv(10):
                pass


def test_closing_frees_the_slots() -> None:
    with rig() as r:
        assert isinstance(r.relay, KernelRelay)
        keys = [key for key, _ in r.relay.keys]
        assert len(keys) == 2
        assert all(bpf.map_lookup(r.path.slots_fd, key, 4) is not None for key in keys)
        free = len(r.path.free)
        r.on_loop(lambda: r.relay.close(EndReason.IDLE_TIMEOUT))
        assert r.conn.reasons == ["idle_timeout"]
        assert len(r.path.free) == free + 2
        assert r.path.owners == {}
        # the cookies are forgotten (closing the sockets took them out of the sockmap)
        assert [bpf.map_lookup(r.path.slots_fd, key, 4) for key in keys] == [None, None]


def test_a_failing_load_logs_one_line_and_gives_the_default_relay(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def no_bpf() -> KernelPath:
        raise PermissionError(1, "map_create(l4lb_slots): Operation not permitted")

    assert kernel_relay.prepare(load=no_bpf) is None
    (line,) = [r.getMessage() for r in caplog.records if "kernel_relay" in r.getMessage()]
    assert line.startswith("event=kernel_relay_unavailable reason=")
    assert "CAP_BPF and CAP_NET_ADMIN" in line


def test_a_failing_self_test_logs_one_line(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> KernelPath:
        path = KernelPath(slots=8)
        path.limit = 0  # every byte is handed back: the self-test sees nothing redirected
        return path

    assert kernel_relay.prepare(load=broken) is None
    (line,) = [r.getMessage() for r in caplog.records if "kernel_relay" in r.getMessage()]
    assert "self-test failed" in line


def test_prepare_gives_a_working_start() -> None:
    assert kernel_relay.prepare(default=splice.start_splice_relay) is not None
