"""A backend that speaks first (SMTP, MySQL, SSH banners) is relayed at once, in every relay mode.

The backend writes its banner as soon as it accepts and reads nothing (the PROXY header, if any,
stays in its receive buffer). The banner is often already there when the connect completes, so
the connect watcher sees EPOLLIN and EPOLLOUT in one event; the relay must still get that EPOLLIN
(with splice it was consumed by the watcher: 4-11 % of connections hung until idle_timeout).
"""

from __future__ import annotations

import select
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from l4lb.proxy_protocol import ProxyHeader
from tests.balancer.conftest import RELAY_MODES
from tests.balancer.helpers import backend, connect
from tests.support.l4lb import config_text, l4lb
from tests.support.peers import free_port

BANNER = b"220 mail.example ESMTP ready\r\n"


def _banner_then_wait(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
    """Send the banner, read nothing, close when the client has gone (or after 30 s)."""
    sock.sendall(BANNER)
    p = select.poll()
    p.register(sock, select.POLLRDHUP)
    p.poll(30_000)


def _one(port: int) -> bool:
    """True when the banner arrived within the client's timeout."""
    with connect(port) as c:
        c.settimeout(10)  # a hang detector: the banner comes at once
        got = b""
        try:
            while len(got) < len(BANNER):
                chunk = c.recv(len(BANNER) - len(got))
                if not chunk:
                    break
                got += chunk
        except TimeoutError:
            return False
        return got == BANNER


@pytest.mark.parametrize("send_proxy", ["v2", "off"])
@pytest.mark.parametrize("mode", RELAY_MODES)
def test_server_speaks_first_banner_always_arrives(
    tmp_path: Path, mode: str, send_proxy: str
) -> None:
    port = free_port()
    with backend(_banner_then_wait, proxy=False) as be:
        cfg = config_text(
            f"127.0.0.1:{port}",
            [be.address],
            top={"relay": mode},
            pool={"send_proxy": send_proxy, "idle_timeout": "60s"},
            access_log="off",
        )
        with l4lb(tmp_path, cfg):
            sequential = [_one(port) for _ in range(150)]
            with ThreadPoolExecutor(max_workers=20) as ex:
                concurrent = list(ex.map(lambda _: _one(port), range(300)))
    hung = sequential.count(False) + concurrent.count(False)
    assert hung == 0, f"{hung} of {len(sequential) + len(concurrent)} never got the banner"
