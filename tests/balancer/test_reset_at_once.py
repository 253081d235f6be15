"""A client that sends its bytes and resets at once (as HAProxy's health checks do, with a LOCAL
header): whatever the balancer already holds for the backend, the PROXY header first, still
reaches it before both sides close, with either relay."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from l4lb.proxy_protocol import Command, local_header, parse
from tests.balancer.conftest import RELAY_MODES
from tests.support.echo_backend import EchoBackend
from tests.support.l4lb import config_text, l4lb
from tests.support.peers import connect_from, free_port, wait_for

TRIES = 10


@pytest.mark.parametrize("relay", RELAY_MODES)
def test_header_reaches_the_backend_when_the_client_resets_at_once(
    tmp_path: Path, relay: str
) -> None:
    port = free_port()
    with EchoBackend("echo") as backend:
        text = config_text(
            f"127.0.0.1:{port}",
            [backend.address],
            top={"relay": relay},
            pool={"send_proxy": "v2"},
            listener={"accept_proxy": "required", "trusted_proxies": ["127.0.0.1/32"]},
        )
        with l4lb(tmp_path, text) as lb:
            for _ in range(TRIES):
                sock = connect_from("127.0.0.1", "127.0.0.1", port)
                sock.sendall(local_header(2))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()  # a reset, right after the header
            assert wait_for(lambda: len(backend.headers) >= TRIES, 10), (
                len(backend.headers),
                lb.log_text()[-2000:],
            )
    headers = [parse(raw)[0] for raw in backend.headers]
    # LOCAL from a trusted upstream: the connection's own addresses go on to the backend
    assert all(h.command is Command.PROXY for h in headers)
    assert all(h.source is not None and h.source[0] == "127.0.0.1" for h in headers)
