"""The accept path: an accepted socket inherits the listener's options, ``defer_accept``
delays the accept until the client speaks (but never shuts out a client that waits for a
banner), and a wake-up accepts what is queued, a batch at most, without an accept() that
meets an empty queue."""

from __future__ import annotations

import asyncio
import errno
import socket
from pathlib import Path
from typing import Any

import pytest

from l4lb.balancer.listener import ACCEPT_BATCH, open_listening_socket
from l4lb.balancer.runtime import Balancer
from l4lb.config.loader import ConfigError, parse_config
from l4lb.proxy_protocol import ProxyHeader
from tests.balancer.conftest import RELAY_MODES
from tests.balancer.helpers import backend, connect, echo, recv_all
from tests.support.l4lb import config_text, l4lb
from tests.support.peers import free_port

_TCP_DEFER_ACCEPT = getattr(socket, "TCP_DEFER_ACCEPT", 9)


def test_accepted_sockets_inherit_the_listeners_nodelay() -> None:
    """TCP_NODELAY is set once on the listening socket; the accept path sets it no more."""
    lsock = open_listening_socket("127.0.0.1", 0)
    with lsock, connect(lsock.getsockname()[1]):
        lsock.setblocking(True)
        sock, _ = lsock.accept()
        with sock:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_defer_accept_is_set_once_on_the_listener_and_follows_a_reload(tmp_path: Path) -> None:
    port = free_port()

    def config(defer: str) -> str:
        return (
            'workers = 1\n[log]\naccess = "off"\n'
            f'[[listeners]]\nname = "main"\nbind = "127.0.0.1:{port}"\npool = "main"\n'
            f'defer_accept = "{defer}"\n'
            '[pools.main]\nbackends = [{ address = "127.0.0.1:9" }]\n'
        )

    opened: list[socket.socket] = []

    def factory(host: str, port: int) -> socket.socket:
        opened.append(open_listening_socket(host, port))
        return opened[-1]

    async def main() -> None:
        balancer = Balancer(parse_config(config("1s")), open_socket=factory)
        balancer.start()
        try:
            (lsock,) = opened
            assert lsock.getsockopt(socket.IPPROTO_TCP, _TCP_DEFER_ACCEPT) == 1
            balancer.reload(parse_config(config("0s")))
            assert opened == [lsock]  # the same socket, its option changed
            assert lsock.getsockopt(socket.IPPROTO_TCP, _TCP_DEFER_ACCEPT) == 0
        finally:
            await balancer.stop(0)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def test_defer_accept_is_bounded_and_rounded_up_to_seconds() -> None:
    def listener(defer: str) -> str:
        return (
            f'[[listeners]]\nname = "main"\nbind = "127.0.0.1:1"\npool = "main"\n'
            f'defer_accept = "{defer}"\n[pools.main]\nbackends = [{{ address = "127.0.0.1:9" }}]\n'
        )

    assert parse_config(listener("1500ms")).listeners[0].defer_accept_s == 2
    assert parse_config(listener("0s")).listeners[0].defer_accept_s == 0
    with pytest.raises(ConfigError, match=r"defer_accept = '31s' is over 30s"):
        parse_config(listener("31s"))


BANNER = b"220 mail.example ESMTP ready\r\n"


def _banner_then_echo(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
    sock.sendall(BANNER)
    echo(sock, header, early)


@pytest.mark.parametrize("mode", RELAY_MODES)
def test_with_defer_accept_a_client_that_waits_for_a_banner_is_still_served(
    tmp_path: Path, mode: str
) -> None:
    """The kernel accepts a silent client after the defer delay (its ACK to the resent SYN-ACK),
    so a server-speaks-first protocol behind a ``defer_accept`` listener is slower, not broken."""
    port = free_port()
    with backend(_banner_then_echo) as be:
        cfg = config_text(
            f"127.0.0.1:{port}",
            [be.address],
            top={"relay": mode},
            listener={"defer_accept": "1s"},
        )
        with l4lb(tmp_path, cfg):
            with connect(port) as silent:
                got = b""
                while len(got) < len(BANNER):  # the client's 20 s timeout detects a hang
                    chunk = silent.recv(len(BANNER) - len(got))
                    assert chunk, "closed before the banner"
                    got += chunk
                assert got == BANNER
                silent.sendall(b"HELO client\r\n")
                silent.shutdown(socket.SHUT_WR)
                assert recv_all(silent) == b"HELO client\r\n"
            with connect(port) as talker:  # a client that speaks first: accepted with its bytes
                talker.sendall(b"EHLO talker\r\n")
                talker.shutdown(socket.SHUT_WR)
                assert recv_all(talker) == BANNER + b"EHLO talker\r\n"


class _CountingSocket(socket.socket):
    """A listening socket that counts the listener's ``accept()`` calls and those that found
    the queue empty; ``tcp_info=False`` plays a kernel that does not tell the queue's length."""

    def __init__(self, sock: socket.socket, tcp_info: bool = True) -> None:
        super().__init__(sock.family, sock.type, sock.proto, sock.detach())
        self.accepts = 0
        self.empty = 0
        self.tcp_info = tcp_info

    def _accept(self) -> tuple[int, tuple[str, int]]:
        self.accepts += 1
        try:
            return super()._accept()  # type: ignore[misc, no-any-return]
        except BlockingIOError:
            self.empty += 1
            raise

    def getsockopt(self, level: int, option: int, *args: int) -> Any:
        if option == socket.TCP_INFO and not self.tcp_info:
            raise OSError(errno.ENOPROTOOPT, "Protocol not available")
        return super().getsockopt(level, option, *args)


def _talk(sock: socket.socket, n: int) -> bytes:
    with sock:
        sock.sendall(b"ping %d" % n)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def _one_wake_up(count: int, tcp_info: bool = True) -> tuple[_CountingSocket, int, int]:
    """Queue ``count`` connections, run the listener's accept callback once by hand (one
    wake-up), then serve them all: (the listening socket, accept() calls and connections
    admitted in that wake-up)."""
    port = free_port()
    opened: list[_CountingSocket] = []

    def factory(host: str, port: int) -> socket.socket:
        opened.append(_CountingSocket(open_listening_socket(host, port), tcp_info))
        return opened[-1]

    with backend(echo) as be:
        cfg = config_text(
            f"127.0.0.1:{port}", [be.address], listener={"defer_accept": "0s"}, access_log="off"
        )

        async def main() -> tuple[int, int]:
            balancer = Balancer(parse_config(cfg), open_socket=factory)
            balancer.start()
            try:
                (lsock,) = opened
                # connect() returns once the handshake is done: each is in the accept queue
                clients = [connect(port) for _ in range(count)]
                balancer.listeners["main"]._accept()
                calls, admitted = lsock.accepts, balancer.listeners["main"].total
                answers = await asyncio.gather(
                    *(asyncio.to_thread(_talk, c, i) for i, c in enumerate(clients))
                )
                assert answers == [b"ping %d" % i for i in range(count)]
            finally:
                await balancer.stop(0)
            return calls, admitted

        loop = asyncio.new_event_loop()
        try:
            calls, admitted = loop.run_until_complete(main())
        finally:
            loop.close()
    return opened[0], calls, admitted


@pytest.mark.parametrize("count", [1, 5])
def test_a_wake_up_accepts_what_is_queued_without_meeting_an_empty_queue(count: int) -> None:
    """After its first accept the listener asks the kernel how many more wait (TCP_INFO of a
    listening socket) and accepts exactly those: no accept() that fails with EAGAIN, which cost
    5-6 µs and an exception per wake-up (at a moderate rate, one per connection)."""
    lsock, calls, admitted = _one_wake_up(count)
    assert (calls, admitted) == (count, count)
    assert lsock.empty == 0  # in the wake-up by hand and in every later one


def test_a_wake_up_accepts_at_most_a_batch_and_leaves_the_rest_to_the_next() -> None:
    """A long queue is taken ACCEPT_BATCH at a time, so the events of connections already
    accepted do not wait behind it; the rest are accepted at the next turn of the loop."""
    lsock, calls, admitted = _one_wake_up(ACCEPT_BATCH + 3)
    assert (calls, admitted) == (ACCEPT_BATCH, ACCEPT_BATCH)
    assert lsock.accepts == ACCEPT_BATCH + 3  # and all were served


def test_where_the_kernel_does_not_tell_the_queue_the_listener_accepts_until_it_is_empty() -> None:
    lsock, calls, admitted = _one_wake_up(3, tcp_info=False)
    assert (calls, admitted) == (4, 3)  # the fourth accept met the empty queue
    assert lsock.empty >= 1
