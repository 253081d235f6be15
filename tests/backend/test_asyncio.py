"""l4lb.backend.asyncio over real sockets: start_server and the create_server factory wrapper."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest

from l4lb.backend.asyncio import ProxyProtocolFactory
from l4lb.proxy_protocol import TLV, TLVType, build, local_header
from l4lb.trust.policy import ProxyPolicy
from tests.backend.servers import (
    CLIENT,
    DEST,
    LoopThread,
    TLSInOneSegment,
    asyncio_greeter,
    closed_by_peer,
    make_cert,
    parse_greeting,
    policy,
    recv_line,
    server_context,
    tls_client,
)
from tests.support.peers import connect_from, wait_for


@pytest.mark.parametrize("version", [1, 2])
def test_header_and_data_in_one_segment(version: int) -> None:
    with asyncio_greeter(policy()) as (port, _seen, _):
        s = connect_from("127.0.0.1", "127.0.0.1", port)
        with s:
            # The header and the first application bytes arrive together: none may be lost.
            s.sendall(build(version, CLIENT, DEST) + b"first\r\nsecond\r\n")
            hello = parse_greeting(recv_line(s))
            assert hello["peer"] == "198.51.100.42:40000"
            assert hello["sock"] == "203.0.113.7:443"
            assert hello["via"].startswith("127.0.0.1:")
            assert hello["v"] == str(version)
            assert recv_line(s) == b"ECHO first\r\n"
            assert recv_line(s) == b"ECHO second\r\n"


@pytest.mark.parametrize("version", [1, 2])
def test_header_split_byte_by_byte_with_pauses(version: int) -> None:
    tlvs = [TLV(TLVType.AUTHORITY, b"example.com"), TLV(TLVType.UNIQUE_ID, b"abc-123")]
    header = build(version, CLIENT, DEST, tlvs=tlvs if version == 2 else ())
    with (
        asyncio_greeter(policy()) as (port, _seen, _),
        connect_from("127.0.0.1", "127.0.0.1", port) as s,
    ):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(header)):
            s.sendall(header[i : i + 1])
            time.sleep(0.002)
        s.sendall(b"after\n")
        hello = parse_greeting(recv_line(s))
        assert hello["peer"] == "198.51.100.42:40000"
        if version == 2:
            assert hello["uid"] == "abc-123" and hello["auth"] == "example.com"
        assert recv_line(s) == b"ECHO after\n"


def test_greeting_waits_for_the_header() -> None:
    """Server-speaks-first: nothing is sent before the header has been read and accepted."""
    header = build(1, CLIENT, DEST)
    with (
        asyncio_greeter(policy()) as (port, seen, _),
        connect_from("127.0.0.1", "127.0.0.1", port) as s,
    ):
        s.sendall(header[:-3])
        s.settimeout(0.3)
        with pytest.raises(TimeoutError):
            s.recv(100)
        assert len(seen) == 0
        s.sendall(header[-3:])
        assert parse_greeting(recv_line(s))["peer"] == "198.51.100.42:40000"


def test_forged_header_from_untrusted_peer_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "l4lb.backend")
    with (
        asyncio_greeter(policy()) as (port, seen, server),
        connect_from("127.0.0.9", "127.0.0.1", port) as s,
    ):
        s.sendall(build(1, ("198.51.100.42", 1), DEST) + b"hello\n")
        assert closed_by_peer(s)
        assert len(seen) == 0
        assert server.proxy_factory.rejections["untrusted"] == 1
    assert any(
        "127.0.0.9" in r.getMessage() and "untrusted" in r.getMessage() for r in caplog.records
    )


def test_optional_spoofing_attempt_and_direct_clients() -> None:
    with (
        asyncio_greeter(policy("optional", timeout=0.5)) as (port, _seen, server),
        connect_from("127.0.0.9", "127.0.0.1", port) as s,
    ):
        s.sendall(build(2, ("198.51.100.42", 1), DEST))
        assert closed_by_peer(s)
        assert server.proxy_factory.rejections["spoofing_attempt"] == 1
        # An untrusted client that speaks first without a header: a direct client, bytes intact.
        with connect_from("127.0.0.9", "127.0.0.1", port) as s:
            s.sendall(b"hi\n")
            hello = parse_greeting(recv_line(s))
            assert hello["peer"].startswith("127.0.0.9:") and hello["v"] == "-"
            assert recv_line(s) == b"ECHO hi\n"
        # A direct client of a server-speaks-first service: greeted after the header timeout.
        with connect_from("127.0.0.8", "127.0.0.1", port) as s:
            hello = parse_greeting(recv_line(s, timeout=10))
            assert hello["peer"].startswith("127.0.0.8:")
        # The trusted balancer may also send a header in optional mode.
        with connect_from("127.0.0.1", "127.0.0.1", port) as s:
            s.sendall(build(1, CLIENT, DEST))
            assert parse_greeting(recv_line(s))["peer"] == "198.51.100.42:40000"


def test_silent_peer_is_closed_at_the_timeout() -> None:
    with asyncio_greeter(policy(timeout=0.5)) as (port, seen, server):
        with (
            connect_from("127.0.0.1", "127.0.0.1", port) as silent,
            connect_from("127.0.0.1", "127.0.0.1", port) as trickle,
        ):
            trickle.sendall(b"PROXY TCP4 ")
            assert closed_by_peer(silent, timeout=10)
            assert closed_by_peer(trickle, timeout=10)
        assert server.proxy_factory.rejections["header_timeout"] == 2
        assert len(seen) == 0


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "bad_header"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "bad_header"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bad_header"),
    ],
)
def test_bad_header_is_refused(data: bytes, reason: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "l4lb.backend")
    with (
        asyncio_greeter(policy()) as (port, _seen, server),
        connect_from("127.0.0.1", "127.0.0.1", port) as s,
    ):
        s.sendall(data)
        assert closed_by_peer(s)
        assert wait_for(lambda: server.proxy_factory.rejections[reason] == 1, timeout=10)
    assert any(reason in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("version", [1, 2])
def test_local_and_unknown_use_the_connection_addresses(version: int) -> None:
    with (
        asyncio_greeter(policy()) as (port, _seen, _),
        connect_from("127.0.0.1", "127.0.0.1", port) as s,
    ):
        s.sendall(local_header(version) + b"ping\n")
        hello = parse_greeting(recv_line(s))
        assert hello["peer"] == f"127.0.0.1:{s.getsockname()[1]}"
        assert hello["sock"] == f"127.0.0.1:{port}"
        assert recv_line(s) == b"ECHO ping\n"


def test_many_clients_each_see_their_own_address() -> None:
    with asyncio_greeter(policy()) as (port, _seen, _):
        socks = []
        for i in range(10):
            s = connect_from("127.0.0.1", "127.0.0.1", port)
            s.sendall(build(1 + i % 2, (f"192.0.2.{i + 1}", 1000 + i), DEST))
            socks.append(s)
        for i, s in enumerate(socks):
            assert parse_greeting(recv_line(s))["peer"] == f"192.0.2.{i + 1}:{1000 + i}"
            s.close()


# --- ProxyProtocolFactory with loop.create_server -----------------------------------------


class Recorder(asyncio.Protocol):
    def __init__(self, results: list[Any]) -> None:
        self.results = results
        self.data = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.results.append(
            (
                transport.get_extra_info("peername"),
                transport.get_extra_info("sockname"),
                transport.get_extra_info("proxy_peer"),
                transport.get_extra_info("socket"),
            )
        )
        assert isinstance(transport, asyncio.Transport)
        transport.write(b"hello\n")

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.data.endswith(b"\n"):
            assert isinstance(self.transport, asyncio.Transport)
            self.transport.write(b"got " + self.data)
            self.data = b""


class BufferedRecorder(asyncio.BufferedProtocol):
    def __init__(self, results: list[Any]) -> None:
        self.results = results
        self.buf = bytearray(7)  # small on purpose: leftovers are delivered in several pieces
        self.data = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.results.append((transport.get_extra_info("peername"),))

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        self.data += bytes(self.buf[:nbytes])
        if self.data.endswith(b"\n"):
            self.transport.write(b"got " + self.data)
            self.data = b""


@pytest.mark.parametrize("protocol_class", [Recorder, BufferedRecorder])
def test_protocol_factory_wrapper(protocol_class: type) -> None:
    results: list[Any] = []
    runner = LoopThread()
    try:
        factory = ProxyProtocolFactory(lambda: protocol_class(results), policy())

        async def start() -> asyncio.Server:
            return await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)

        server = runner.call(start())
        port = server.sockets[0].getsockname()[1]
        with connect_from("127.0.0.1", "127.0.0.1", port) as s:
            s.sendall(build(2, CLIENT, DEST) + b"leftover bytes after the header\n")
            if protocol_class is Recorder:
                assert recv_line(s) == b"hello\n"
            assert recv_line(s) == b"got leftover bytes after the header\n"
            s.sendall(b"more\n")
            assert recv_line(s) == b"got more\n"
        assert results[0][0] == CLIENT
        if protocol_class is Recorder:
            assert results[0][1] == DEST
            assert results[0][2][0] == "127.0.0.1"
            assert results[0][3] is None  # the raw socket would name the balancer
        runner.close_server(server)
    finally:
        runner.close()


def test_ipv6_listener_and_clients() -> None:
    v6 = ProxyPolicy(mode="required", trusted=["::1"], header_timeout=5)
    with (
        asyncio_greeter(v6, host="::1") as (port, _seen, _server),
        socket.create_connection(("::1", port)) as s,
    ):
        s.sendall(build(2, ("2001:db8::7", 443), ("2001:db8::1", 8443)) + b"x\n")
        hello = parse_greeting(recv_line(s))
        assert hello["peer"] == "2001:db8::7:443" and hello["sock"] == "2001:db8::1:8443"
        assert hello["via"].startswith("::1:")
        assert recv_line(s) == b"ECHO x\n"


@pytest.mark.parametrize("version", [1, 2])
def test_tls_terminated_after_the_header(tmp_path: Path, version: int) -> None:
    """The balancer passes TLS through; TLS starts here right after the header."""
    cert, key = make_cert(tmp_path)
    with asyncio_greeter(policy(), ssl=server_context(cert, key)) as (port, seen, _):
        s = connect_from("127.0.0.1", "127.0.0.1", port)
        s.sendall(build(version, CLIENT, DEST))
        with tls_client(s, cert) as t:
            t.sendall(b"secret\n")
            hello = parse_greeting(recv_line(t))
            assert hello["peer"] == "198.51.100.42:40000" and hello["v"] == str(version)
            assert recv_line(t) == b"ECHO secret\n"
        assert seen.connections[0]["tls"] == "TLSv1.3"


@pytest.mark.parametrize("version", [1, 2])
def test_tls_client_hello_in_the_same_segment_as_the_header(tmp_path: Path, version: int) -> None:
    cert, key = make_cert(tmp_path)
    with (
        asyncio_greeter(policy(), ssl=server_context(cert, key)) as (port, _seen, _),
        connect_from("127.0.0.1", "127.0.0.1", port) as s,
    ):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = TLSInOneSegment(s, cert, build(version, CLIENT, DEST))
        client.sendall(b"x\n")
        text = client.recv_until(b"ECHO x\n")
        assert text.startswith(b"HELLO peer=198.51.100.42:40000 ")


def test_tls_handshake_failure_is_logged_and_closed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "l4lb.backend")
    cert, key = make_cert(tmp_path)
    with (
        asyncio_greeter(policy(), ssl=server_context(cert, key)) as (port, seen, _),
        connect_from("127.0.0.1", "127.0.0.1", port) as s,
    ):
        s.sendall(build(1, CLIENT, DEST) + b"GET / HTTP/1.1\r\n\r\n")  # plain text, not TLS
        assert closed_by_peer(s)
        # Logged from the server's thread, maybe just after the close: wait while it runs.
        assert wait_for(lambda: "TLS handshake with 198.51.100.42:40000" in caplog.text)
        assert len(seen) == 0


def test_tls_refuses_optional_mode() -> None:
    with pytest.raises(ValueError, match="needs accept_proxy 'required'"):
        ProxyProtocolFactory(Recorder, policy("optional"), ssl=ssl.create_default_context())
