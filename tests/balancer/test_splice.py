"""The splice relay on its own, over real loopback TCP: exactness, half-close, reset, backpressure,
idle timeout, and no pipe held by an idle connection.

The relay runs on an event loop in a background thread (uvloop when installed, as in production);
the test plays the client and the backend with plain blocking sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import select
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from l4lb.balancer import poller, splice
from l4lb.balancer.relay_contract import EndReason
from tests.balancer.helpers import new_loop, tcp_pair
from tests.support.peers import wait_for

pytestmark = pytest.mark.skipif(not splice.available(), reason="os.splice needs Linux")


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
    """The test's client end (its peer is the relay's client socket)."""
    backend: socket.socket
    """The test's backend end (its peer is the relay's backend socket)."""
    conn: Conn
    relay: splice.SpliceRelay
    loop: asyncio.AbstractEventLoop

    def call(self, fn: object, *args: object) -> None:
        self.loop.call_soon_threadsafe(fn, *args)  # type: ignore[arg-type]


@contextlib.contextmanager
def rig(first: bytes = b"", early: bytes = b"") -> Iterator[Rig]:
    """A started splice relay; ``early``: client bytes already queued when it starts."""
    client, relay_client = tcp_pair()
    relay_backend, backend = tcp_pair()
    for s in (client, backend):
        s.settimeout(15)
    client.sendall(early)
    loop = new_loop()
    conn = Conn()
    made: list[splice.SpliceRelay] = []
    ready = threading.Event()

    def begin() -> None:
        made.append(splice.start_splice_relay(loop, relay_client, relay_backend, first, conn))
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    loop.call_soon_threadsafe(begin)
    assert ready.wait(10)
    try:
        yield Rig(client, backend, conn, made[0], loop)
    finally:
        loop.call_soon_threadsafe(made[0].close, EndReason.SHUTDOWN)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        client.close()
        backend.close()


def _recv_all(s: socket.socket) -> bytes:
    out = bytearray()
    while chunk := s.recv(1 << 16):
        out += chunk
    return bytes(out)


def _digest_all(s: socket.socket) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    while chunk := s.recv(1 << 16):
        h.update(chunk)
        n += len(chunk)
    return n, h.hexdigest()


def test_byte_exact_both_directions_at_once_after_first_bytes() -> None:
    up = os.urandom(24 << 20)
    down = os.urandom(24 << 20)
    first = b"PROXY TCP4 127.0.0.1 127.0.0.1 1 2\r\nearly"
    with rig(first=first) as r:
        results: dict[str, tuple[int, str]] = {}

        def send(s: socket.socket, data: bytes) -> None:
            view = memoryview(data)
            for i in range(0, len(data), 70_001):  # odd chunking
                s.sendall(view[i : i + 70_001])
            s.shutdown(socket.SHUT_WR)

        def recv(name: str, s: socket.socket) -> None:
            results[name] = _digest_all(s)

        threads = [
            threading.Thread(target=send, args=(r.client, up)),
            threading.Thread(target=send, args=(r.backend, down)),
            threading.Thread(target=recv, args=("backend", r.backend)),
            threading.Thread(target=recv, args=("client", r.client)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results["backend"] == (len(first) + len(up), hashlib.sha256(first + up).hexdigest())
        assert results["client"] == (len(down), hashlib.sha256(down).hexdigest())
        assert r.conn.done.wait(10)
        assert r.conn.reasons == ["client_closed"] or r.conn.reasons == ["backend_closed"]
        assert r.conn.bytes_from_client == len(up)
        assert r.conn.bytes_to_client == len(down)


@pytest.mark.parametrize("first_side", ["client", "backend"])
def test_half_close_keeps_the_other_direction_flowing(first_side: str) -> None:
    with rig() as r:
        closer, other = (r.client, r.backend) if first_side == "client" else (r.backend, r.client)
        closer.sendall(b"last words")
        closer.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < 10:
            got += other.recv(100)
        assert got == b"last words"
        assert other.recv(100) == b""  # the FIN came through
        payload = os.urandom(3 << 20)
        sender = threading.Thread(target=other.sendall, args=(payload,))
        sender.start()
        received = bytearray()
        while len(received) < len(payload):
            chunk = closer.recv(1 << 16)
            assert chunk, "the reverse direction ended early"
            received += chunk
        sender.join(10)
        assert bytes(received) == payload
        assert not r.conn.done.is_set()  # still open while one direction flows
        other.shutdown(socket.SHUT_WR)
        assert closer.recv(100) == b""
        assert r.conn.done.wait(10)
        assert r.conn.reasons == [f"{first_side}_closed"]


@pytest.mark.parametrize("side", ["client", "backend"])
def test_reset_on_one_side_closes_the_other_promptly(side: str) -> None:
    with rig() as r:
        resetter, other = (r.client, r.backend) if side == "client" else (r.backend, r.client)
        resetter.sendall(b"x")
        assert other.recv(10) == b"x"
        resetter.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        resetter.close()
        assert r.conn.done.wait(5)
        assert r.conn.reasons == ["reset"]
        other.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert other.recv(10) == b""


def test_slow_reader_bounds_what_the_relay_holds() -> None:
    """The backend pushes while the client reads nothing: the backend's send soon blocks."""
    with rig() as r:
        r.backend.settimeout(1.0)
        pushed = 0
        block = os.urandom(1 << 16)
        with pytest.raises(TimeoutError):
            while pushed < 512 << 20:
                pushed += r.backend.send(block)
        # socket buffers on both hops plus at most one pipe: far below what was offered
        assert pushed < 64 << 20
        assert r.relay.to_client.pending <= splice.PIPE_SIZE
        r.backend.settimeout(15)
        received = 0
        while received < pushed:
            chunk = r.client.recv(1 << 20)
            assert chunk
            received += len(chunk)
        assert received == pushed


def test_idle_connection_holds_no_pipe() -> None:
    """Idle timeouts belong to the runtime's sweep (tests/balancer/test_relay.py); an idle
    relayed connection holds no pipe, and closing it for idleness ends both sides once."""
    with rig() as r:
        for _ in range(3):
            r.client.sendall(b"ping")
            assert r.backend.recv(10) == b"ping"
            r.backend.sendall(b"pong")
            assert r.client.recv(10) == b"pong"
        assert not r.conn.done.is_set()
        assert r.relay.to_backend.pipe is None and r.relay.to_client.pipe is None
        r.call(r.relay.close, EndReason.IDLE_TIMEOUT)
        assert r.conn.done.wait(5)
        assert r.conn.reasons == ["idle_timeout"]
        assert r.client.recv(10) == b""
        assert r.backend.recv(10) == b""


def test_close_ends_both_sides_once() -> None:
    with rig() as r:
        r.call(r.relay.close, EndReason.SHUTDOWN)
        assert r.conn.done.wait(5)
        assert r.client.recv(10) == b""
        assert r.backend.recv(10) == b""
        r.call(r.relay.close, EndReason.ERROR)  # ignored: already closed
        threading.Event().wait(0.1)
        assert r.conn.reasons == ["shutdown"]


def test_pool_reuses_empty_pipes_and_caps_spares() -> None:
    pool = splice.PipePool(keep=1)
    a = pool.take()
    b = pool.take()
    pool.give(a)
    pool.give(b)  # over the cap: closed
    assert pool.take() == a
    with pytest.raises(OSError):
        os.fstat(b[0])
    pool.give(a)
    pool.clear()


def test_bytes_sent_before_a_reset_are_delivered_first() -> None:
    with rig() as r:
        r.backend.sendall(b"last answer")
        r.backend.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        r.backend.close()
        got = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := r.client.recv(100):
                got += chunk
        assert got == b"last answer"
        assert r.conn.done.wait(5)
        assert r.conn.reasons == ["reset"]


def test_small_messages_are_copied_and_bulk_is_spliced() -> None:
    with rig() as r:
        for _ in range(3):
            r.client.sendall(b"small request")
            assert r.backend.recv(100) == b"small request"
        assert r.relay.to_backend.copy  # never a full read: still copying
        payload = os.urandom(8 << 20)
        sender = threading.Thread(target=r.backend.sendall, args=(payload,))
        sender.start()
        got = bytearray()
        while len(got) < len(payload):
            got += r.client.recv(1 << 20)
        sender.join(10)
        assert bytes(got) == payload
        assert not r.relay.to_client.copy  # switched to splice on the first full read
        # the counter moves just after the kernel took the bytes: give it a moment
        assert wait_for(lambda: r.conn.bytes_to_client == len(payload), 5)
        assert wait_for(lambda: r.conn.bytes_from_client == 3 * len(b"small request"), 5)


def test_many_tiny_writes_then_fin_arrive_whole() -> None:
    """Short reads end a wake-up early: a FIN arriving with the last bytes must not be missed."""
    with rig() as r:
        r.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        expected = b"".join(b"m%05d;" % i for i in range(3000))

        def send() -> None:
            for i in range(0, len(expected), 7):
                r.client.send(expected[i : i + 7])
            r.client.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        assert _recv_all(r.backend) == expected
        sender.join(10)
        r.backend.sendall(b"bye")
        r.backend.shutdown(socket.SHUT_WR)
        assert _recv_all(r.client) == b"bye"
        assert r.conn.done.wait(5)
        assert r.conn.reasons == ["client_closed"]


def _run(coro_fn: object) -> object:
    loop = new_loop()
    try:
        return loop.run_until_complete(coro_fn())  # type: ignore[operator]
    finally:
        loop.close()


def test_wait_connected_reports_success_failure_and_can_be_abandoned() -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        live = srv.getsockname()[1]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            dead = probe.getsockname()[1]  # bound, never listening: connections are refused

            async def main() -> list[object]:
                loop = asyncio.get_running_loop()
                out: list[object] = []
                for port in (live, dead):
                    s = socket.socket()
                    s.setblocking(False)
                    s.connect_ex(("127.0.0.1", port))
                    fut = loop.create_future()
                    poller.wait_connected(
                        loop,
                        s,
                        lambda s=s, fut=fut: fut.set_result(
                            s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        ),
                    )
                    out.append(await asyncio.wait_for(fut, 5))
                    s.close()
                calls: list[int] = []
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", live))
                poller.wait_connected(loop, s, lambda: calls.append(1))
                poller.stop_waiting(loop, s)
                await asyncio.sleep(0.2)
                s.close()
                out.append(calls)
                return out

            ok, refused, abandoned = _run(main)  # type: ignore[misc]
    assert ok == 0
    assert refused == errno.ECONNREFUSED
    assert abandoned == []


def _connecting(srv: socket.socket) -> socket.socket:
    """A non-blocking socket connecting to ``srv``."""
    sock = socket.socket()
    sock.setblocking(False)
    sock.connect_ex(srv.getsockname())
    return sock


async def _connected(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Wait with the poller's connect watch, as the connection does."""
    fut = loop.create_future()
    poller.wait_connected(loop, sock, lambda: fut.set_result(None))
    await asyncio.wait_for(fut, 5)


def test_a_relay_takes_over_a_socket_watched_while_connecting() -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:

        async def main() -> bytes:
            loop = asyncio.get_running_loop()
            client, relay_client = tcp_pair()
            backend = _connecting(srv)
            await _connected(loop, backend)
            far, _ = await loop.sock_accept(srv)
            conn = Conn()
            relay_client.setblocking(False)
            splice.start_splice_relay(loop, relay_client, backend, b"hdr:", conn)
            far.setblocking(False)
            client.sendall(b"ping")
            got = b""
            while len(got) < 8:
                got += await loop.sock_recv(far, 100)
            await loop.sock_sendall(far, b"pong")
            client.settimeout(5)
            answer = await loop.run_in_executor(None, client.recv, 100)
            for s in (client, far):
                s.close()
            # the relay sees both closes
            assert await loop.run_in_executor(None, conn.done.wait, 10)
            return got + b"|" + answer

        assert _run(main) == b"hdr:ping|pong"


def test_a_relay_taking_over_a_connect_gets_the_bytes_that_came_with_it() -> None:
    """The backend spoke first: its banner was there when the connect completed, so the connect
    watch saw EPOLLIN and EPOLLOUT in one event. The splice relay must still relay the banner
    (it hung until the idle timeout: the edge was consumed by the watch)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:

        async def main() -> bytes:
            loop = asyncio.get_running_loop()
            client, relay_client = tcp_pair()
            backend = _connecting(srv)
            srv.settimeout(5)
            far, _ = srv.accept()  # blocking: the loop sees nothing until the banner is there
            far.sendall(b"220 ready\r\n")
            assert select.select([backend], [], [], 5)[0]
            await _connected(loop, backend)
            conn = Conn()
            relay_client.setblocking(False)
            splice.start_splice_relay(loop, relay_client, backend, b"", conn)
            client.settimeout(5)
            try:
                return await loop.run_in_executor(None, client.recv, 100)
            finally:
                for s in (client, far):
                    s.close()

        assert _run(main) == b"220 ready\r\n"


def _nodelay(r: Rig) -> int:
    return r.relay.backend.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_backend_nodelay_waits_for_a_second_write() -> None:
    """A first write that fits one segment leaves at once with Nagle on, so TCP_NODELAY is set
    on the backend socket only before a second write (a short connection never pays it)."""
    header = b"PROXY TCP4 127.0.0.1 127.0.0.1 1 2\r\n"
    with rig(first=header) as r:
        got = b""
        while len(got) < len(header):
            got += r.backend.recv(1024)
        assert got == header and _nodelay(r) == 0
        r.client.sendall(b"GET / HTTP/1.1\r\n\r\n")
        got = b""
        while not got.endswith(b"\r\n\r\n"):
            got += r.backend.recv(1024)
        assert got == b"GET / HTTP/1.1\r\n\r\n" and _nodelay(r)


def test_backend_nodelay_set_before_a_first_write_over_one_segment() -> None:
    """A first write larger than the smallest segment could be held back by Nagle in part."""
    with rig(first=b"h" * 600) as r:
        got = b""
        while len(got) < 600:
            got += r.backend.recv(1024)
        assert got == b"h" * 600 and _nodelay(r)


def test_an_answer_and_fin_arriving_together_are_both_passed_on() -> None:
    """The backend answers and closes at once (one EPOLLIN|EPOLLRDHUP wake-up): the answer and
    then the FIN reach the client; the FIN is inferred from the short read, not read."""
    with rig() as r:
        r.client.sendall(b"request")
        assert r.backend.recv(100) == b"request"
        r.backend.sendall(b"answer")
        r.backend.shutdown(socket.SHUT_WR)
        assert _recv_all(r.client) == b"answer"
        r.client.shutdown(socket.SHUT_WR)
        assert _recv_all(r.backend) == b""
        assert r.conn.done.wait(5)
        assert r.conn.reasons == ["backend_closed"]


@pytest.mark.parametrize("early_size", [100, 100_000])
@pytest.mark.parametrize(
    "header_size",
    [28, poller.SCRATCH_ROOM, poller.SCRATCH_ROOM + 44],
    ids=["v2-header", "header-filling-the-room", "header-longer-than-the-room"],
)
def test_client_bytes_queued_before_the_start_follow_the_header_byte_exact(
    header_size: int, early_size: int
) -> None:
    """The first write is the header with the client's queued bytes behind it: a header that
    fits the scratch buffer's room goes in front of a read into the room, a longer one (many
    TLVs) is copied first and read after; a read that fills the buffer switches to splice."""
    header = os.urandom(header_size)
    early = os.urandom(early_size)
    rest = os.urandom(300_000)
    with rig(first=header, early=early) as r:
        got: dict[str, tuple[int, str]] = {}
        reader = threading.Thread(target=lambda: got.update(backend=_digest_all(r.backend)))
        reader.start()
        r.client.sendall(rest)
        r.client.shutdown(socket.SHUT_WR)
        reader.join(30)
        sent = header + early + rest
        assert got["backend"] == (len(sent), hashlib.sha256(sent).hexdigest())
        r.backend.shutdown(socket.SHUT_WR)
        assert _recv_all(r.client) == b""
        assert r.conn.done.wait(10)
        assert r.conn.bytes_from_client == len(early) + len(rest)
