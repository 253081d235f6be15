"""l4lb.backend.socketserver over real sockets: StreamRequestHandler and http.server handlers."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest

from l4lb.proxy_protocol import TLV, TLVType, build, local_header
from tests.backend.servers import (
    CLIENT,
    DEST,
    closed_by_peer,
    http_get,
    http_server,
    make_cert,
    parse_greeting,
    policy,
    recv_line,
    server_context,
    socketserver_greeter,
    tls_client,
)
from tests.support.peers import connect_from, wait_for


@pytest.mark.parametrize("version", [1, 2])
def test_header_then_data_not_one_byte_lost(version: int) -> None:
    with (
        socketserver_greeter(policy()) as (port, _server),
        connect_from("127.0.0.1", "127.0.0.1", port) as s,
    ):
        s.sendall(build(version, CLIENT, DEST) + b"one\ntwo\n")
        hello = parse_greeting(recv_line(s))
        assert hello["peer"] == "198.51.100.42:40000"
        assert hello["sock"] == "203.0.113.7:443"
        assert hello["via"].startswith("127.0.0.1:")
        assert recv_line(s) == b"ECHO one\n"
        assert recv_line(s) == b"ECHO two\n"


@pytest.mark.parametrize("version", [1, 2])
def test_split_header_with_pauses(version: int) -> None:
    tlvs = [TLV(TLVType.UNIQUE_ID, b"id-7")] if version == 2 else []
    header = build(version, CLIENT, DEST, tlvs=tlvs)
    with (
        socketserver_greeter(policy()) as (port, _server),
        connect_from("127.0.0.1", "127.0.0.1", port) as s,
    ):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(header), 3):
            s.sendall(header[i : i + 3])
            time.sleep(0.01)
        # The greeting is not sent before the whole header is in (server speaks first).
        s.sendall(b"x\n")
        hello = parse_greeting(recv_line(s))
        assert hello["peer"] == "198.51.100.42:40000"
        if version == 2:
            assert hello["uid"] == "id-7"
        assert recv_line(s) == b"ECHO x\n"


def test_greeting_waits_for_the_header() -> None:
    header = build(2, CLIENT, DEST)
    with (
        socketserver_greeter(policy()) as (port, server),
        connect_from("127.0.0.1", "127.0.0.1", port) as s,
    ):
        s.sendall(header[:10])
        s.settimeout(0.3)
        with pytest.raises(TimeoutError):
            s.recv(100)
        assert len(server.seen) == 0
        s.sendall(header[10:])
        assert parse_greeting(recv_line(s))["peer"] == "198.51.100.42:40000"


def test_untrusted_forged_header_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "l4lb.backend")
    with socketserver_greeter(policy()) as (port, server):
        with connect_from("127.0.0.9", "127.0.0.1", port) as s:
            s.sendall(build(1, ("198.51.100.42", 1), DEST) + b"hi\n")
            assert closed_by_peer(s)
        assert len(server.seen) == 0
        assert server.proxy_rejections == {"untrusted": 1}
    assert any("rejected 127.0.0.9:" in r.getMessage() for r in caplog.records)


def test_optional_spoofing_and_direct() -> None:
    with socketserver_greeter(policy("optional", timeout=0.5)) as (port, server):
        with connect_from("127.0.0.9", "127.0.0.1", port) as s:
            s.sendall(build(2, ("198.51.100.42", 1), DEST))
            assert closed_by_peer(s)
        assert server.proxy_rejections == {"spoofing_attempt": 1}
        with connect_from("127.0.0.9", "127.0.0.1", port) as s:
            s.sendall(b"direct\n")
            assert parse_greeting(recv_line(s))["peer"].startswith("127.0.0.9:")
            assert recv_line(s) == b"ECHO direct\n"
        with connect_from("127.0.0.8", "127.0.0.1", port) as s:  # server speaks first, direct
            assert parse_greeting(recv_line(s))["peer"].startswith("127.0.0.8:")


def test_silent_and_trickling_peers_closed_at_the_timeout() -> None:
    with socketserver_greeter(policy(timeout=0.5)) as (port, server):
        with (
            connect_from("127.0.0.1", "127.0.0.1", port) as silent,
            connect_from("127.0.0.1", "127.0.0.1", port) as partial,
        ):
            partial.sendall(b"\r\n\r\n\x00")
            assert closed_by_peer(silent, timeout=10)
            assert closed_by_peer(partial, timeout=10)
        assert wait_for(lambda: server.proxy_rejections.get("header_timeout") == 2)
        assert len(server.seen) == 0


def test_peer_closing_mid_header_is_an_eof_not_a_wait() -> None:
    # With a 60 s header timeout, a close within 20 s can only come from seeing the FIN.
    with socketserver_greeter(policy(timeout=60.0)) as (port, server):
        s = connect_from("127.0.0.1", "127.0.0.1", port)
        s.sendall(b"PROXY TCP4 1.2")
        s.shutdown(socket.SHUT_WR)
        assert closed_by_peer(s, timeout=20)
        s.close()
        assert wait_for(lambda: server.proxy_rejections.get("eof") == 1, timeout=20)


def test_bad_header_refused() -> None:
    with socketserver_greeter(policy()) as (port, server):
        with connect_from("127.0.0.1", "127.0.0.1", port) as s:
            s.sendall(b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\nhello\n")
            assert closed_by_peer(s)
        assert server.proxy_rejections == {"bad_header": 1}


@pytest.mark.parametrize("version", [1, 2])
def test_local_header_uses_the_socket_addresses(version: int) -> None:
    with (
        socketserver_greeter(policy()) as (port, _server),
        connect_from("127.0.0.1", "127.0.0.1", port) as s,
    ):
        s.sendall(local_header(version) + b"x\n")
        assert parse_greeting(recv_line(s))["peer"] == f"127.0.0.1:{s.getsockname()[1]}"
        assert recv_line(s) == b"ECHO x\n"


def test_http_server_sees_and_logs_the_real_client() -> None:
    with http_server(policy()) as (port, server):
        with connect_from("127.0.0.1", "127.0.0.1", port) as s:
            s.sendall(build(2, ("192.0.2.77", 5555), ("127.0.0.1", port)))
            first = http_get(s, "/a")
            second = http_get(s, "/b")  # keep-alive: the same real client
        assert first["client"] == ["192.0.2.77", 5555]
        assert second["client"] == ["192.0.2.77", 5555] and second["path"] == "/b"
        assert first["via"][0] == "127.0.0.1"
        assert wait_for(lambda: len(server.log_lines) == 2)
        assert all(line.startswith("192.0.2.77 - ") for line in server.log_lines)
        with connect_from("127.0.0.9", "127.0.0.1", port) as s:
            s.sendall(build(1, ("192.0.2.1", 1), ("127.0.0.1", port)) + b"GET / HTTP/1.1\r\n\r\n")
            assert closed_by_peer(s)
        assert server.proxy_rejections == {"untrusted": 1}


@pytest.mark.parametrize("mode", ["required", "optional"])
def test_http_server_with_tls_after_the_header(tmp_path: Path, mode: str) -> None:
    cert, key = make_cert(tmp_path)
    with http_server(policy(mode), ssl=server_context(cert, key)) as (port, _server):
        s = connect_from("127.0.0.1", "127.0.0.1", port)
        s.sendall(build(2, ("192.0.2.77", 5555), ("127.0.0.1", port)))
        with tls_client(s, cert) as t:
            info = http_get(t)
            assert info["client"] == ["192.0.2.77", 5555] and info["tls"] == "TLSv1.3"
        if mode == "optional":  # a direct TLS client: nothing of its ClientHello was consumed
            with tls_client(connect_from("127.0.0.9", "127.0.0.1", port), cert) as t:
                assert http_get(t)["client"][0] == "127.0.0.9"
        with connect_from("127.0.0.1", "127.0.0.1", port) as s:
            s.sendall(build(1, ("192.0.2.1", 1), ("127.0.0.1", port)) + b"GET / HTTP/1.1\r\n\r\n")
            assert closed_by_peer(s)  # plain text where TLS was due: handshake fails, closed


def test_dual_stack_listener_matches_mapped_ipv4_peers() -> None:
    """An IPv4 balancer reaching a "::" listener is ::ffff:127.0.0.1, trusted as 127.0.0.1/32."""
    with socketserver_greeter(policy(), dual_stack=True) as (port, server):
        with connect_from("127.0.0.1", "127.0.0.1", port) as s:
            s.sendall(build(1, CLIENT, DEST))
            hello = parse_greeting(recv_line(s))
            assert hello["peer"] == "198.51.100.42:40000"
            assert hello["via"].startswith("::ffff:127.0.0.1:")
        with connect_from("127.0.0.9", "127.0.0.1", port) as s:  # ::ffff:127.0.0.9: untrusted
            s.sendall(build(1, CLIENT, DEST))
            assert closed_by_peer(s)
        assert server.proxy_rejections == {"untrusted": 1}
