"""LOCAL headers whose protocol block is not TLVs (spec 2.2: the receiver must accept LOCAL and
discard its protocol block; with AF_UNSPEC it ignores any address information).

The codec vectors are in vectors.py (``v2-local-*``); here the same headers go through the trust
gate and through a running balancer over real sockets, which must serve them with the
connection's own addresses, byte-exact, and still refuse a LOCAL header whose CRC32C is wrong.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest

from l4lb.proxy_protocol import Command, parse
from l4lb.trust.policy import ProxyPolicy, Reason
from tests.support.echo_backend import EchoBackend
from tests.support.l4lb import config_text, l4lb
from tests.support.peers import free_port, wait_for

from .vectors import TCP4_BLOCK, ipv4_block, tlv, v2, with_crc

LOCAL_HEADERS = {
    "unspec-dummy-inet-block": v2(0x20, 0x00, ipv4_block("127.0.0.1", "127.0.0.1", 8080, 8080)),
    "unspec-100-not-tlvs": v2(0x20, 0x00, b"\xff" * 100),
    "unix-100-not-tlvs": v2(0x20, 0x31, bytes(216) + b"\xff" * 100),
    "inet-block-stray-byte": v2(0x20, 0x11, TCP4_BLOCK + b"\x01"),
    "unspec-crc32c": with_crc(0x20, 0x00, b"", tlv(0x04, b"pad")),
}
BAD_CRC = with_crc(0x20, 0x00, b"", tlv(0x04, b"pad"))[:-1] + b"\x00"
PAYLOAD = b"health check payload \x00\xff" * 50


@pytest.mark.parametrize("name", sorted(LOCAL_HEADERS))
def test_trust_gate_accepts_local_with_the_socket_addresses(name: str) -> None:
    policy = ProxyPolicy("required", ["127.0.0.0/8"])
    gate = policy.start(("127.0.0.9", 40000), ("127.0.0.1", 8443))
    data = LOCAL_HEADERS[name]
    decision = gate.feed(data + b"rest")
    assert decision is not None and decision.accepted, decision
    assert decision.reason is Reason.LOCAL
    assert decision.client == ("127.0.0.9", 40000)
    assert decision.destination == ("127.0.0.1", 8443)
    assert decision.consumed == len(data)
    assert decision.trailing == b"rest"


def test_trust_gate_refuses_local_with_a_wrong_crc32c() -> None:
    gate = ProxyPolicy("required", ["127.0.0.0/8"]).start(("127.0.0.9", 1), ("127.0.0.1", 2))
    decision = gate.feed(BAD_CRC)
    assert decision is not None and not decision.accepted
    assert decision.reason is Reason.BAD_HEADER
    assert decision.detail.startswith("crc_mismatch")


def _through(port: int, first: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(first + PAYLOAD)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError as err:  # refused and reset before our FIN could go: nothing to read
            if err.errno != errno.ENOTCONN:
                raise
            return b""
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:  # refused with our bytes unread: the kernel resets
            assert data == b""
    return data


def test_balancer_serves_local_headers_end_to_end(tmp_path: Path) -> None:
    port = free_port()
    with EchoBackend("echo") as backend:
        cfg = config_text(
            f"127.0.0.1:{port}",
            [backend.address],
            pool={"send_proxy": "v2"},
            listener={"accept_proxy": "required", "trusted_proxies": ["127.0.0.1/32"]},
        )
        with l4lb(tmp_path, cfg) as lb:
            for name in sorted(LOCAL_HEADERS):
                assert _through(port, LOCAL_HEADERS[name]) == b"echo\n" + PAYLOAD, name
            # Each backend connection started with a PROXY (not LOCAL) header naming the real
            # peer, the balancer's client on 127.0.0.1.
            assert len(backend.headers) == len(LOCAL_HEADERS)
            for raw in backend.headers:
                header, _ = parse(raw)
                assert header.command is Command.PROXY
                assert header.source is not None and header.source[0] == "127.0.0.1"
            assert _through(port, BAD_CRC) == b""
            assert wait_for(lambda: "crc_mismatch" in lb.log_text()), lb.log_text()
    assert len(backend.headers) == len(LOCAL_HEADERS)
