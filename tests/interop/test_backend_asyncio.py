"""Real HAProxy and nginx in front of l4lb.backend.asyncio: each client's own address arrives."""

from __future__ import annotations

from pathlib import Path

from l4lb.proxy_protocol import TLV, TLVType, build
from l4lb.trust.policy import ProxyPolicy
from tests.backend.servers import (
    asyncio_greeter,
    closed_by_peer,
    front_ends,
    parse_greeting,
    recv_line,
)
from tests.support.peers import connect_from

CLIENTS = ["127.0.0.7", "127.0.0.8"]


def test_haproxy_and_nginx_in_front(tmp_path: Path) -> None:
    policy = ProxyPolicy(mode="required", trusted=["127.0.0.1/32"], header_timeout=5)
    with asyncio_greeter(policy) as (port, _seen, server), front_ends(tmp_path, port) as fronts:
        for name in ("haproxy-v1", "haproxy-v2", "nginx"):
            for ip in CLIENTS:
                with connect_from(ip, "127.0.0.1", fronts[name]) as s:
                    own = f"{ip}:{s.getsockname()[1]}"
                    hello = parse_greeting(recv_line(s))
                    assert hello["peer"] == own, name
                    assert hello["sock"] == f"127.0.0.1:{fronts[name]}", name
                    assert hello["via"].startswith("127.0.0.1:")
                    assert hello["v"] == ("2" if name == "haproxy-v2" else "1")
                    if name == "haproxy-v2":
                        assert hello["uid"] == own  # unique-id-format %ci:%cp
                    s.sendall(b"through " + name.encode() + b"\n")
                    assert recv_line(s) == b"ECHO through " + name.encode() + b"\n"
        # HAProxy with accept-proxy passes on the authority of the header it received.
        with connect_from("127.0.0.7", "127.0.0.1", fronts["haproxy-chain"]) as s:
            tlvs = [TLV(TLVType.AUTHORITY, b"shop.example")]
            s.sendall(build(2, ("192.0.2.5", 1234), ("127.0.0.1", 443), tlvs=tlvs))
            hello = parse_greeting(recv_line(s))
            assert hello["peer"] == "192.0.2.5:1234"
            assert hello["uid"] == "192.0.2.5:1234"
            assert hello["auth"] == "shop.example"
        # A forged header straight from an untrusted client is refused.
        with connect_from("127.0.0.9", "127.0.0.1", port) as s:
            s.sendall(build(1, ("198.51.100.42", 1), ("127.0.0.1", port)))
            assert closed_by_peer(s)
        assert server.proxy_factory.rejections["untrusted"] == 1


def test_haproxy_health_checks_send_local_and_are_accepted(tmp_path: Path) -> None:
    """HAProxy's checks with check-send-proxy: v2 sends LOCAL (v1 its own addresses); accepted."""
    from tests.support.peers import free_port, haproxy, wait_for

    policy = ProxyPolicy(mode="required", trusted=["127.0.0.1/32"], header_timeout=5)
    with asyncio_greeter(policy) as (port, seen, server):
        body = (
            f"listen checked\n    bind 127.0.0.1:{free_port()}\n"
            f"    server v2 127.0.0.1:{port} send-proxy-v2 check check-send-proxy inter 100ms\n"
            f"    server v1 127.0.0.1:{port} send-proxy check check-send-proxy inter 100ms\n"
        )
        with haproxy(tmp_path, body):

            def versions_seen() -> set[tuple[int, str]]:
                with seen.lock:
                    return {
                        (c["header"].version, c["header"].command.name)
                        for c in seen.connections
                        if c["header"] is not None
                    }

            assert wait_for(lambda: versions_seen() == {(1, "PROXY"), (2, "LOCAL")}, timeout=10)
        with seen.lock:
            for conn in seen.connections:
                assert conn["peername"][0] == "127.0.0.1"  # the connection's own address
        assert not server.proxy_factory.rejections


def test_tls_passed_through_haproxy_and_nginx(tmp_path: Path) -> None:
    """The balancers pass TLS through untouched; TLS ends here, after their PROXY header."""
    from tests.backend.servers import make_cert, server_context, tls_client

    cert, key = make_cert(tmp_path)
    policy = ProxyPolicy(mode="required", trusted=["127.0.0.1/32"], header_timeout=5)
    with (
        asyncio_greeter(policy, ssl=server_context(cert, key)) as (port, _seen, _),
        front_ends(tmp_path, port) as fronts,
    ):
        for name in ("haproxy-v1", "haproxy-v2", "nginx"):
            s = connect_from("127.0.0.8", "127.0.0.1", fronts[name])
            own = f"127.0.0.8:{s.getsockname()[1]}"
            with tls_client(s, cert) as t:
                t.sendall(b"over tls\n")
                hello = parse_greeting(recv_line(t))
                assert hello["peer"] == own, name
                assert recv_line(t) == b"ECHO over tls\n"
