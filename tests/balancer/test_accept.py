"""The accept path: one ``accept4`` gives a non-blocking, close-on-exec socket that inherits the
listener's options, names the client as the standard library does, and ``defer_accept`` delays
the accept until the client speaks (but never shuts out a client that waits for a banner)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import select
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from l4lb.balancer.listener import accept_function, open_listening_socket
from l4lb.balancer.runtime import Balancer
from l4lb.config.loader import ConfigError, parse_config
from l4lb.proxy_protocol import ProxyHeader
from tests.balancer.conftest import RELAY_MODES
from tests.balancer.helpers import backend, connect, echo, recv_all
from tests.support.l4lb import config_text, l4lb
from tests.support.peers import free_port

_TCP_DEFER_ACCEPT = getattr(socket, "TCP_DEFER_ACCEPT", 9)


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@contextmanager
def _listening(host: str) -> Iterator[socket.socket]:
    sock = open_listening_socket(host, 0)
    try:
        yield sock
    finally:
        sock.close()


def _accept_one(listener: socket.socket) -> tuple[socket.socket, tuple[str, int]]:
    accept = accept_function(listener)
    select.select([listener], [], [], 10)
    return accept()


def test_an_accepted_socket_is_nonblocking_cloexec_and_has_the_listeners_nodelay() -> None:
    with _listening("127.0.0.1") as lsock, connect(lsock.getsockname()[1]) as client:
        sock, peer = _accept_one(lsock)
        with sock:
            assert sock.gettimeout() == 0.0
            assert fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
            assert fcntl.fcntl(sock.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert peer == client.getsockname()
            with pytest.raises(BlockingIOError):  # really non-blocking: nothing to read yet
                sock.recv(1)
            client.sendall(b"x")
            select.select([sock], [], [], 10)
            assert sock.recv(1) == b"x"


def test_accept_with_nothing_waiting_raises_blocking_io_error() -> None:
    with _listening("127.0.0.1") as lsock, pytest.raises(BlockingIOError):
        accept_function(lsock)()


def test_accept_names_a_client_as_socket_accept_does() -> None:
    with _listening("127.0.0.1") as lsock, connect(lsock.getsockname()[1], "127.0.0.7") as c:
        sock, peer = _accept_one(lsock)
        sock.close()
        assert peer == ("127.0.0.7", c.getsockname()[1])
    with _listening("::") as lsock:  # dual stack: an IPv4 client is v4-mapped
        port = lsock.getsockname()[1]
        with connect(port, "127.0.0.7") as c:
            sock, peer = _accept_one(lsock)
            sock.close()
            assert peer == ("::ffff:127.0.0.7", c.getsockname()[1])
        if _has_ipv6():
            with connect(port, "::1", "::1") as c:
                sock, peer = _accept_one(lsock)
                sock.close()
                assert peer == ("::1", c.getsockname()[1])


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
