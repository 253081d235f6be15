"""A connect to a loopback backend is finished inside ``connect()``: the connection does not wait
for the loop's next turn to learn it (``Connection.connect_next``, issue 16 fourth round).

On Linux the handshake to a loopback address runs synchronously through the lo device, so the
second ``connect()`` right after ``EINPROGRESS`` answers 0 (connected) or the refusal itself. These
tests call ``Connection.start()`` and look at the connection right after it returns, before the
event loop has run once: with the old path the connection was still CONNECTING there.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from l4lb.balancer import kernel_relay, poller, relay, splice
from l4lb.balancer.admission import Admitted
from l4lb.balancer.connection import Connection, State
from l4lb.balancer.pool import Pool
from l4lb.balancer.relay_contract import EndReason, StartRelay
from l4lb.config.schema import BackendConfig, PoolConfig
from l4lb.proxy_protocol import HeaderReader
from tests.balancer.conftest import RELAY_MODES
from tests.balancer.helpers import dead_port, tcp_pair
from tests.balancer.test_connection import Owner

CLIENT = ("127.0.0.7", 40000)
DESTINATION = ("127.0.0.1", 443)


def _relay(mode: str) -> StartRelay:
    if mode in ("splice", "kernel") and not splice.available():
        pytest.skip("os.splice needs Linux")
    if mode == "splice":
        return splice.start_splice_relay
    if mode == "kernel":
        from tests.balancer.kernel_support import UNAVAILABLE

        if UNAVAILABLE is not None:
            pytest.skip(UNAVAILABLE)
        return kernel_relay.make_start(splice.start_splice_relay, handover=kernel_relay.AT_ONCE)
    return relay.start_relay


def _pool(addresses: list[str], **kw: Any) -> Pool:
    return Pool("p", PoolConfig(backends=tuple(BackendConfig(address=a) for a in addresses), **kw))


def _connection(
    loop: asyncio.AbstractEventLoop, start_relay: StartRelay, pool: Pool
) -> tuple[Connection, list[State], Owner, socket.socket]:
    client, accepted = tcp_pair()
    accepted.setblocking(False)
    owner = Owner(loop, start_relay)
    states: list[State] = []
    conn = Connection(owner, pool, accepted, Admitted(CLIENT, DESTINATION), on_state=states.append)
    return conn, states, owner, client


def _run(body: Callable[[asyncio.AbstractEventLoop], Awaitable[None]]) -> None:
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(body(loop), 20))
    finally:
        loop.close()


def _started(
    loop: asyncio.AbstractEventLoop, start_relay: StartRelay
) -> tuple[socket.socket, Pool, tuple[Connection, list[State], Owner, socket.socket]]:
    """A listening loopback backend, and a connection to it started with b"hello" queued."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.setblocking(False)
    pool = _pool([f"127.0.0.1:{srv.getsockname()[1]}"])
    made = _connection(loop, start_relay, pool)
    made[3].sendall(b"hello")
    made[0].start()
    return srv, pool, made


async def _ended(owner: Owner) -> tuple[EndReason, str]:
    while not owner.ends:
        await asyncio.sleep(0.01)
    return owner.ends[0]


@pytest.mark.parametrize("mode", RELAY_MODES)
def test_a_loopback_backend_is_relaying_when_start_returns(mode: str) -> None:
    start_relay = _relay(mode)

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        srv, pool, (conn, states, owner, client) = _started(loop, start_relay)
        # within this callback, no turn of the loop since: the connect was seen finished
        assert states == [State.CONNECTING, State.RELAYING]
        assert pool.backends[0].total == 1  # counted as a connect that succeeded
        far, _ = await loop.sock_accept(srv)
        reader = HeaderReader()
        header = None
        while header is None:
            chunk = await loop.sock_recv(far, reader.next_read_size())
            assert chunk, "closed before the header"
            header = reader.feed(chunk)
        assert (header.source, header.destination) == (CLIENT, DESTINATION)
        got = reader.trailing
        while len(got) < 5:
            got += await loop.sock_recv(far, 10)
        assert got == b"hello"
        await loop.sock_sendall(far, b"world")
        client.settimeout(10)
        assert await loop.run_in_executor(None, client.recv, 10) == b"world"
        conn.close(EndReason.SHUTDOWN)
        assert (await _ended(owner))[0] is EndReason.SHUTDOWN
        assert pool.backends[0].active == 0
        for s in (far, client, srv):
            s.close()

    _run(body)


def test_a_refused_loopback_connect_is_known_when_start_returns() -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        dead = f"127.0.0.1:{dead_port()}"
        pool = _pool([dead])
        conn, states, owner, client = _connection(loop, relay.start_relay, pool)
        conn.start()
        # the second connect() returned the refusal, and consumed it (SO_ERROR says 0 after
        # it: a watch would then have taken the connect for a success)
        assert states == [State.CONNECTING, State.CLOSED]
        assert len(owner.ends) == 1
        reason, detail = owner.ends[0]
        assert reason is EndReason.CONNECT_FAILED
        assert detail.startswith(f"{dead}: ") and "refused" in detail
        assert pool.backends[0].connect_failures == 1 and pool.backends[0].active == 0
        client.settimeout(5)
        with pytest.raises(ConnectionResetError):
            client.recv(10)
        client.close()

    _run(body)


def test_a_refused_loopback_backend_is_retried_on_the_next_one_within_start() -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        srv = socket.create_server(("127.0.0.1", 0))
        dead = f"127.0.0.1:{dead_port()}"
        live = f"127.0.0.1:{srv.getsockname()[1]}"
        pool = _pool([dead, live], retries=1)  # roundrobin starts with the first
        conn, states, owner, client = _connection(loop, relay.start_relay, pool)
        conn.start()
        assert states == [State.CONNECTING, State.CONNECTING, State.RELAYING]
        assert [b.address for b in conn.tried] == [dead, live]
        assert pool.by_address[dead].connect_failures == 1
        conn.close(EndReason.SHUTDOWN)
        assert (await _ended(owner))[0] is EndReason.SHUTDOWN
        assert pool.by_address[live].active == 0
        client.close()
        srv.close()

    _run(body)


def test_a_backend_connected_at_once_wakes_nothing_until_it_speaks() -> None:
    """Registered for input only (``Poller.take_input``): its room to write is no event. Added
    for output too, the set reported EPOLLOUT at once, a loop wake-up for nothing per
    connection (failed before the change: the backend's EPOLLOUT was in the poll below)."""
    start_relay = _relay("splice")

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        srv, _, (conn, states, owner, client) = _started(loop, start_relay)
        assert states == [State.CONNECTING, State.RELAYING]
        backend = conn.backend_sock
        assert backend is not None
        # what the loop would be woken for now: nothing from the backend (nothing came yet)
        ready = dict(poller.for_loop(loop).ep.poll(0))
        assert backend.fileno() not in ready, ready
        far, _ = await loop.sock_accept(srv)
        reader = HeaderReader()
        header = None
        while header is None:
            header = reader.feed(await loop.sock_recv(far, reader.next_read_size()))
        got = reader.trailing
        while len(got) < 5:
            got += await loop.sock_recv(far, 10)
        assert got == b"hello"
        await loop.sock_sendall(far, b"world")  # input: that wakes it, and is relayed
        client.settimeout(10)
        assert await loop.run_in_executor(None, client.recv, 10) == b"world"
        conn.close(EndReason.SHUTDOWN)
        assert (await _ended(owner))[0] is EndReason.SHUTDOWN
        for s in (far, client, srv):
            s.close()

    _run(body)
