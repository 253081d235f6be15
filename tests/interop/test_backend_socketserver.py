"""Real HAProxy and nginx in front of socketserver and http.server handlers with the mixin."""

from __future__ import annotations

from pathlib import Path

from l4lb.proxy_protocol import build
from l4lb.trust.policy import ProxyPolicy
from tests.backend.servers import (
    closed_by_peer,
    front_ends,
    http_get,
    http_server,
    parse_greeting,
    recv_line,
    socketserver_greeter,
)
from tests.support.peers import connect_from, wait_for

CLIENTS = ["127.0.0.7", "127.0.0.8"]
POLICY = ProxyPolicy(mode="required", trusted=["127.0.0.1/32"], header_timeout=5)


def test_stream_handler_behind_haproxy_and_nginx(tmp_path: Path) -> None:
    with socketserver_greeter(POLICY) as (port, server), front_ends(tmp_path, port) as fronts:
        for name in ("haproxy-v1", "haproxy-v2", "nginx"):
            for ip in CLIENTS:
                with connect_from(ip, "127.0.0.1", fronts[name]) as s:
                    own = f"{ip}:{s.getsockname()[1]}"
                    hello = parse_greeting(recv_line(s))
                    assert hello["peer"] == own, name
                    assert hello["sock"] == f"127.0.0.1:{fronts[name]}"
                    if name == "haproxy-v2":
                        assert hello["v"] == "2" and hello["uid"] == own
                    s.sendall(b"data\n")
                    assert recv_line(s) == b"ECHO data\n"
        with connect_from("127.0.0.9", "127.0.0.1", port) as s:
            s.sendall(build(2, ("198.51.100.42", 1), ("127.0.0.1", port)))
            assert closed_by_peer(s)
        assert server.proxy_rejections.get("untrusted") == 1


def test_http_server_behind_haproxy_and_nginx(tmp_path: Path) -> None:
    with http_server(POLICY) as (port, server), front_ends(tmp_path, port) as fronts:
        expected_logs = set()
        for name in ("haproxy-v1", "haproxy-v2", "nginx"):
            for ip in CLIENTS:
                with connect_from(ip, "127.0.0.1", fronts[name]) as s:
                    own = [ip, s.getsockname()[1]]
                    for path in ("/one", "/two"):  # keep-alive: both requests see the client
                        info = http_get(s, path)
                        assert info["client"] == own, name
                        assert info["destination"] == ["127.0.0.1", fronts[name]]
                    if name == "haproxy-v2":
                        assert info["unique_id"] == f"{ip}:{own[1]}"
                expected_logs.add(ip)
        # http.server's own log lines name the real clients, never the balancer.
        assert wait_for(lambda: len(server.log_lines) >= 12)
        assert {line.split(" ", 1)[0] for line in server.log_lines} == expected_logs
