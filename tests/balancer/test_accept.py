"""The accept path: an accepted socket inherits the listener's options, and ``defer_accept``
delays the accept until the client speaks (but never shuts out a client that waits for a
banner)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from l4lb.balancer.listener import open_listening_socket
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
