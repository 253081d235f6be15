"""Connection, the state machine, driven in-process: loopback sockets, a real Pool, no subprocess.

Each test runs an event loop in the test's own thread and plays the client and the backends with
plain sockets; the owner (what a Listener provides) is a small recorder. Orderings that end-to-end
tests could only reach with sleeps (closed while connecting, a relay that ends inside its own
start, a retry after a refusal) are driven here step by step and awaited on the event itself.
"""

from __future__ import annotations

import _socket
import asyncio
import gc
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from l4lb.balancer import connection, kernel_relay, relay, splice
from l4lb.balancer.admission import Admission, Admitted
from l4lb.balancer.connection import Connection, State
from l4lb.balancer.pool import Pool
from l4lb.balancer.relay_contract import (
    EndReason,
    RelayConn,
    StartRelay,
    python_socket,
    socket_class,
)
from l4lb.config.schema import BackendConfig, ListenerConfig, PoolConfig
from l4lb.proxy_protocol import HeaderReader
from tests.balancer.conftest import RELAY_MODES
from tests.balancer.helpers import dead_port, tcp_pair

CLIENT = ("127.0.0.7", 40000)
DESTINATION = ("127.0.0.1", 443)


class Owner:
    """What a Listener gives its connections: a name, the loop, the relay; records the end."""

    name = "unit"

    def __init__(self, loop: asyncio.AbstractEventLoop, start_relay: StartRelay) -> None:
        self.loop = loop
        self.admission = Admission(
            ListenerConfig(name=self.name, bind="127.0.0.1:1", pool="p"),
            loop=loop,
            on_reject=lambda rejected: None,
        )
        self.start_relay = start_relay
        self.ends: list[tuple[EndReason, str]] = []
        self.ended: asyncio.Future[tuple[EndReason, str]] = loop.create_future()

    def connection_ended(self, conn: Connection, reason: EndReason, detail: str) -> None:
        self.ends.append((reason, detail))
        if not self.ended.done():
            self.ended.set_result((reason, detail))


def recorded(*args: Any) -> tuple[Connection, list[State]]:
    """A Connection and the list of the states it goes through (its ``on_state``)."""
    states: list[State] = []
    return Connection(*args, on_state=states.append), states


class ReadsSeen(asyncio.SelectorEventLoop):
    """An event loop that tells when a reader callback on one file descriptor has run.

    The connection's peek is the reader on the client socket while it is PEEKING, so a test
    can wait for "the first bytes were looked at" on the event itself (a compiled Connection
    cannot be subclassed to hook ``_peek``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.fd = -1
        self.read: asyncio.Event = asyncio.Event()

    def add_reader(self, fd: Any, callback: Callable[..., object], *args: Any) -> None:
        if fd != self.fd:
            super().add_reader(fd, callback, *args)
            return

        def reader() -> None:
            callback(*args)
            self.read.set()

        super().add_reader(fd, reader)


def _pool(addresses: list[str], **kw: Any) -> Pool:
    """A pool of these backends; sequences in ``kw`` are tuples, as the config loader makes them
    (a compiled pool.py checks the declared types)."""
    backends = tuple(BackendConfig(address=a) for a in addresses)
    return Pool("p", PoolConfig(backends=backends, **kw))


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(the test's client end, the balancer's accepted end), both TCP over loopback."""
    a, b = tcp_pair()
    b.setblocking(False)
    return a, b


def _server() -> socket.socket:
    srv = socket.create_server(("127.0.0.1", 0))
    srv.setblocking(False)
    return srv


def _run(
    body: Callable[[asyncio.AbstractEventLoop], Awaitable[None]],
    loop: asyncio.AbstractEventLoop | None = None,
) -> None:
    loop = loop or asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(body(loop), 20))
    finally:
        loop.close()


def _relay(mode: str) -> StartRelay:
    if mode in ("splice", "kernel") and not splice.available():
        pytest.skip("os.splice needs Linux")
    if mode == "splice":
        return splice.start_splice_relay
    if mode == "kernel":  # into the kernel at once: this test's connection is short
        from tests.balancer.kernel_support import UNAVAILABLE

        if UNAVAILABLE is not None:
            pytest.skip(UNAVAILABLE)
        return kernel_relay.make_start(splice.start_splice_relay, handover=kernel_relay.AT_ONCE)
    return relay.start_relay


async def _read_header(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[Any, bytes]:
    reader = HeaderReader()
    header = None
    while header is None:
        chunk = await loop.sock_recv(sock, reader.next_read_size())
        assert chunk, "closed before the header"
        header = reader.feed(chunk)
    return header, reader.trailing


@pytest.mark.parametrize("mode", RELAY_MODES)
def test_relays_with_header_then_ends_client_closed(mode: str) -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        srv = _server()
        client, accepted = _tcp_pair()
        owner = Owner(loop, _relay(mode))
        pool = _pool([f"127.0.0.1:{srv.getsockname()[1]}"])
        conn, states = recorded(owner, pool, accepted, Admitted(CLIENT, DESTINATION))
        assert conn.state is State.NEW
        conn.start()
        far, _ = await loop.sock_accept(srv)
        header, early = await _read_header(loop, far)
        assert header.source == CLIENT and header.destination == DESTINATION
        client.sendall(b"ping")
        got = early
        while len(got) < 4:
            got += await loop.sock_recv(far, 10)
        assert got == b"ping"
        assert conn.state is State.RELAYING
        await loop.sock_sendall(far, b"pong")
        client.settimeout(5)
        assert await loop.run_in_executor(None, client.recv, 10) == b"pong"
        client.shutdown(socket.SHUT_WR)
        assert await loop.sock_recv(far, 10) == b""
        far.close()
        assert await owner.ended == (EndReason.CLIENT_CLOSED, "")
        assert states == [State.CONNECTING, State.RELAYING, State.CLOSED]
        assert (conn.bytes_from_client, conn.bytes_to_client) == (4, 4)
        assert pool.backends[0].active == 0 and pool.backends[0].bytes_in == 4
        client.close()
        srv.close()

    _run(body)


def test_no_backend_resets_the_client() -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        client, accepted = _tcp_pair()
        owner = Owner(loop, relay.start_relay)
        pool = _pool(["127.0.0.1:9"])
        pool.set_admin(pool.backends[0], "disable")
        conn, states = recorded(owner, pool, accepted, Admitted(CLIENT, DESTINATION))
        conn.start()
        reason, detail = await owner.ended
        assert reason is EndReason.NO_BACKEND
        assert detail == "no backend of pool p is available"
        assert states == [State.CLOSED]
        client.settimeout(5)
        with pytest.raises(ConnectionResetError):
            client.recv(10)
        client.close()

    _run(body)


def test_a_refused_connect_is_retried_on_the_next_backend() -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        srv = _server()
        client, accepted = _tcp_pair()
        owner = Owner(loop, relay.start_relay)
        dead = f"127.0.0.1:{dead_port()}"
        live = f"127.0.0.1:{srv.getsockname()[1]}"
        pool = _pool([dead, live], retries=1)  # roundrobin starts with the first
        conn, states = recorded(owner, pool, accepted, Admitted(CLIENT, DESTINATION))
        conn.start()
        far, _ = await loop.sock_accept(srv)
        await _read_header(loop, far)
        assert states == [State.CONNECTING, State.CONNECTING, State.RELAYING]
        assert [b.address for b in conn.tried] == [dead, live]
        assert pool.by_address[dead].connect_failures == 1
        assert pool.by_address[dead].active == 0
        conn.close(EndReason.SHUTDOWN)
        assert (await owner.ended)[0] is EndReason.SHUTDOWN
        assert pool.by_address[live].active == 0
        for s in (client, far, srv):
            s.close()

    _run(body)


def test_every_backend_refusing_ends_connect_failed_with_the_last_error() -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        client, accepted = _tcp_pair()
        owner = Owner(loop, relay.start_relay)
        dead = f"127.0.0.1:{dead_port()}"
        pool = _pool([dead], retries=2)
        conn, states = recorded(owner, pool, accepted, Admitted(CLIENT, DESTINATION))
        conn.start()
        reason, detail = await owner.ended
        assert reason is EndReason.CONNECT_FAILED
        assert detail.startswith(f"{dead}: ") and "refused" in detail
        assert states == [State.CONNECTING, State.CLOSED]
        assert pool.backends[0].active == 0
        client.settimeout(5)
        with pytest.raises(ConnectionResetError):
            client.recv(10)
        client.close()

    _run(body)


def _unanswered_server() -> tuple[socket.socket, socket.socket]:
    """A listener whose accept queue is full (backlog 0, one connection waiting): a further
    connect gets no answer on loopback, so it stays in progress until its timeout."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    filler = socket.create_connection(srv.getsockname())
    return srv, filler


def test_connect_timeout_ends_connect_failed() -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        srv, filler = _unanswered_server()
        client, accepted = _tcp_pair()
        owner = Owner(loop, relay.start_relay)
        pool = _pool([f"127.0.0.1:{srv.getsockname()[1]}"], connect_timeout="200ms")
        conn, states = recorded(owner, pool, accepted, Admitted(CLIENT, DESTINATION))
        conn.start()
        reason, detail = await owner.ended
        assert reason is EndReason.CONNECT_FAILED
        assert detail.endswith("connect timeout after 0.2s"), detail
        assert states == [State.CONNECTING, State.CLOSED]
        assert conn.deadlines is None and conn.backend_sock is None
        for s in (client, filler, srv):
            s.close()

    _run(body)


def test_closed_while_connecting_ends_once_and_never_relays() -> None:
    """A stop (shutdown) while the connect is in flight: one end, the connect abandoned."""

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        srv, filler = _unanswered_server()  # the connect stays in progress
        client, accepted = _tcp_pair()
        relays: list[object] = []

        def start_relay(*args: Any) -> Any:
            relays.append(args)
            return relay.start_relay(*args)

        owner = Owner(loop, start_relay)
        pool = _pool([f"127.0.0.1:{srv.getsockname()[1]}"])
        conn, states = recorded(owner, pool, accepted, Admitted(CLIENT, DESTINATION))
        conn.start()
        assert conn.state is State.CONNECTING
        backend_sock = conn.backend_sock
        deadlines = conn.deadlines  # the connect timeout, shared with the loop's other connects
        assert backend_sock is not None and deadlines is not None and conn in deadlines.waiting
        conn.close(EndReason.SHUTDOWN)
        assert owner.ends == [(EndReason.SHUTDOWN, "")]
        assert backend_sock.fileno() == -1 and conn.deadlines is None
        assert conn not in deadlines.waiting
        conn.close(EndReason.IDLE_TIMEOUT)
        assert owner.ends == [(EndReason.SHUTDOWN, "")] and relays == []
        assert states == [State.CONNECTING, State.CLOSED]
        assert pool.backends[0].active == 0
        client.settimeout(5)
        assert client.recv(10) == b""  # closed, not refused: a stop is not the backend's fault
        for s in (client, filler, srv):
            s.close()

    _run(body)


def test_a_relay_ending_inside_its_own_start_is_accounted_once() -> None:
    """The relay may report its end before ``start_relay`` returns (the client reset first):
    the connection is RELAYING by then, so the relay's sockets are not closed twice."""

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        srv = _server()
        client, accepted = _tcp_pair()

        class Instant:
            def close(self, reason: EndReason) -> None:
                raise AssertionError("closed after it ended")

        def start_relay(
            loop: asyncio.AbstractEventLoop,
            client_sock: socket.socket,
            backend_sock: socket.socket,
            first: bytes,
            conn: RelayConn,
        ) -> Instant:
            client_sock.close()
            backend_sock.close()
            conn.relay_closed(EndReason.RESET)
            return Instant()

        owner = Owner(loop, start_relay)
        pool = _pool([f"127.0.0.1:{srv.getsockname()[1]}"])
        conn, states = recorded(owner, pool, accepted, Admitted(CLIENT, DESTINATION))
        conn.start()
        assert await owner.ended == (EndReason.RESET, "")
        assert states == [State.CONNECTING, State.RELAYING, State.CLOSED]
        conn.close(EndReason.SHUTDOWN)
        assert len(owner.ends) == 1
        assert pool.backends[0].active == 0
        for s in (client, srv):
            s.close()

    _run(body)


def test_peek_waits_for_the_client_then_connects_after_the_timeout() -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        srv = _server()
        client, accepted = _tcp_pair()
        owner = Owner(loop, relay.start_relay)
        pool = _pool(
            [f"127.0.0.1:{srv.getsockname()[1]}"],
            proxy_tlvs=("authority",),
            tls_peek_timeout="100ms",
        )
        conn, states = recorded(owner, pool, accepted, Admitted(CLIENT, DESTINATION))
        conn.start()
        assert conn.state is State.PEEKING
        far, _ = await loop.sock_accept(srv)  # after the peek timeout: a silent client
        header, _ = await _read_header(loop, far)
        assert header.source == CLIENT
        assert states == [State.PEEKING, State.CONNECTING, State.RELAYING]
        assert conn.authority is None
        conn.close(EndReason.SHUTDOWN)
        assert (await owner.ended)[0] is EndReason.SHUTDOWN
        for s in (client, far, srv):
            s.close()

    _run(body)


def test_connect_timeouts_of_many_connections_share_one_deadline_table() -> None:
    """Connects time out in the order they started, per timeout value, through one timer per
    (loop, timeout): each connection still gets its own pool's timeout, and the table is gone
    once the last one has timed out."""

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        srv, filler = _unanswered_server()
        target = [f"127.0.0.1:{srv.getsockname()[1]}"]
        fast, slow = _pool(target, connect_timeout="200ms"), _pool(target, connect_timeout="400ms")
        pairs, conns, owners, seen = [], [], [], []
        for pool in (slow, fast, fast, slow, fast):
            client, accepted = _tcp_pair()
            owner = Owner(loop, relay.start_relay)
            conn, states = recorded(owner, pool, accepted, Admitted(CLIENT, DESTINATION))
            conn.start()
            pairs.append(client)
            conns.append(conn)
            owners.append(owner)
            seen.append(states)
        assert connection.loop_parts(loop).deadlines.keys() == {0.2, 0.4}
        ends = await asyncio.gather(*(o.ended for o in owners))
        for (reason, detail), conn, states in zip(ends, conns, seen, strict=True):
            assert reason is EndReason.CONNECT_FAILED
            assert detail.endswith(f"connect timeout after {conn.pool.connect_timeout:g}s")
            assert conn.deadlines is None and states == [State.CONNECTING, State.CLOSED]
        assert not connection.loop_parts(loop).deadlines
        for s in (*pairs, filler, srv):
            s.close()

    _run(body)


def test_closed_while_peeking_stops_watching_the_client() -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        client, accepted = _tcp_pair()
        owner = Owner(loop, relay.start_relay)
        pool = _pool(["127.0.0.1:9"], proxy_tlvs=("alpn",), tls_peek_timeout="10s")
        conn, states = recorded(owner, pool, accepted, Admitted(CLIENT, DESTINATION))
        conn.start()
        conn.close(EndReason.SHUTDOWN)
        assert owner.ends == [(EndReason.SHUTDOWN, "")]
        assert states == [State.PEEKING, State.CLOSED]
        assert conn.timer is None
        client.settimeout(5)
        assert client.recv(10) == b""  # a clean close: not refused, just ended
        client.close()

    _run(body)


def test_a_step_out_of_order_is_a_bug_not_a_silent_success() -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        client, accepted = _tcp_pair()
        owner = Owner(loop, relay.start_relay)
        conn = Connection(owner, _pool(["127.0.0.1:9"]), accepted, Admitted(CLIENT, DESTINATION))
        conn.close(EndReason.SHUTDOWN)
        with pytest.raises(RuntimeError, match="CLOSED -> CONNECTING"):
            conn.connect_next()
        client.close()

    _run(body)


def test_a_client_hello_split_over_two_segments_is_waited_for() -> None:
    """The peek sees the first part (not enough: NEED_DATA), keeps waiting, and takes SNI and
    ALPN from the whole ClientHello; nothing is consumed, so the backend gets every byte."""
    from tests.balancer.test_tls_peek import client_hello

    hello_bytes = client_hello("split.example.test", ["h2"])

    peeks = ReadsSeen()

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        srv = _server()
        client, accepted = _tcp_pair()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peeks.fd = accepted.fileno()
        owner = Owner(loop, relay.start_relay)
        pool = _pool(
            [f"127.0.0.1:{srv.getsockname()[1]}"],
            proxy_tlvs=("authority", "alpn"),
            tls_peek_timeout="10s",
        )
        conn, states = recorded(owner, pool, accepted, Admitted(CLIENT, DESTINATION))
        conn.start()
        client.sendall(hello_bytes[:40])
        await peeks.read.wait()  # the first part was looked at: not a whole ClientHello yet
        assert conn.state is State.PEEKING
        client.sendall(hello_bytes[40:])
        far, _ = await loop.sock_accept(srv)
        header, early = await _read_header(loop, far)
        assert header.authority == "split.example.test" and header.alpn == b"h2"
        got = early
        while len(got) < len(hello_bytes):
            got += await loop.sock_recv(far, 1 << 16)
        assert got == hello_bytes
        assert states == [State.PEEKING, State.CONNECTING, State.RELAYING]
        conn.close(EndReason.SHUTDOWN)
        assert (await owner.ended)[0] is EndReason.SHUTDOWN
        for s in (client, far, srv):
            s.close()

    _run(body, peeks)


def test_a_spliced_connection_leaves_no_reference_cycle() -> None:
    """When it ends, a spliced connection's objects go by reference counting: nothing of it
    is left for the cyclic GC to find (a cycle costs a GC pass over every young object)."""
    if not splice.available():
        pytest.skip("os.splice needs Linux")
    gc.collect()
    gc.disable()
    try:

        async def body(loop: asyncio.AbstractEventLoop) -> None:
            srv = _server()
            client, accepted = _tcp_pair()
            owner = Owner(loop, splice.start_splice_relay)
            pool = _pool([f"127.0.0.1:{srv.getsockname()[1]}"])
            Connection(owner, pool, accepted, Admitted(CLIENT, DESTINATION)).start()
            far, _ = await loop.sock_accept(srv)
            await _read_header(loop, far)
            client.sendall(b"ping")
            client.shutdown(socket.SHUT_WR)
            assert await loop.sock_recv(far, 10) == b"ping"
            far.close()
            assert await owner.ended == (EndReason.CLIENT_CLOSED, "")
            for s in (client, srv):
                s.close()

        _run(body)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, Connection | splice.SpliceRelay)]
        assert left == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_the_stream_relay_takes_c_sockets_made_for_another_relay() -> None:
    """A connection accepted while the splice relay was configured has C sockets
    (``_socket.socket``); a reload may hand it to the stream relay, whose uvloop transports
    need ``socket.socket`` objects: they are wrapped, and the C objects no longer own the
    descriptors (nothing closes those numbers a second time)."""
    uvloop = pytest.importorskip("uvloop")

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        srv = _server()
        client, accepted = _tcp_pair()
        c_accepted = _socket.socket(accepted.family, accepted.type, 0, accepted.detach())
        owner = Owner(loop, relay.start_relay)
        pool = _pool([f"127.0.0.1:{srv.getsockname()[1]}"])
        conn = Connection(owner, pool, c_accepted, Admitted(CLIENT, DESTINATION))
        conn.start()
        far, _ = await loop.sock_accept(srv)
        await _read_header(loop, far)
        c_backend = conn.backend_sock
        assert type(c_backend) is _socket.socket  # the client socket's class
        client.sendall(b"ping")
        assert await loop.sock_recv(far, 10) == b"ping"
        await loop.sock_sendall(far, b"pong")
        client.settimeout(5)
        assert await loop.run_in_executor(None, client.recv, 10) == b"pong"
        assert c_accepted.fileno() == -1 and c_backend.fileno() == -1  # detached, wrapped
        client.shutdown(socket.SHUT_WR)
        assert await loop.sock_recv(far, 10) == b""
        far.close()
        assert await owner.ended == (EndReason.CLIENT_CLOSED, "")
        for s in (client, srv):
            s.close()

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(body(loop), 20))
    finally:
        loop.close()


def test_python_socket_wraps_a_c_socket_and_leaves_a_socket_object_as_it_is() -> None:
    a, b = socket.socketpair()
    assert python_socket(a) is a
    fd = b.fileno()
    c = _socket.socket(b.family, b.type, 0, b.detach())
    wrapped = python_socket(c)
    assert isinstance(wrapped, socket.socket) and wrapped.fileno() == fd
    assert c.fileno() == -1  # the C object gave the descriptor up: one owner only
    a.sendall(b"x")
    assert wrapped.recv(1) == b"x"
    assert socket_class(relay.start_relay) is socket.socket
    if splice.available():
        assert socket_class(splice.start_splice_relay) is _socket.socket
    for s in (a, wrapped):
        s.close()


class _SkewedLoop(asyncio.SelectorEventLoop):
    """A loop whose clock is 1000 s ahead of ``time.monotonic()``."""

    def time(self) -> float:
        return super().time() + 1000.0


def test_the_sweeps_clocks_start_at_the_accept_in_the_loops_clock() -> None:
    """A connection reads one clock when it is made (``time.monotonic``, its ``started``); the
    sweep's Progress objects, made when it first looks, place that moment in the loop's clock,
    which the sweep compares them with, whatever that clock's origin."""
    loop = _SkewedLoop()
    client, accepted = _tcp_pair()
    try:
        owner = Owner(loop, relay.start_relay)
        before = loop.time()
        conn = Connection(owner, _pool(["127.0.0.1:9"]), accepted, Admitted(CLIENT, DESTINATION))
        after = loop.time()
        for progress in (conn.progress, conn.client_progress, conn.server_progress):
            # 1 ms of slack for the float arithmetic on both clocks, not for time passing
            assert before - 1e-3 <= progress.since <= after + 1e-3
            assert progress.count == 0
    finally:
        client.close()
        accepted.close()
        loop.close()
