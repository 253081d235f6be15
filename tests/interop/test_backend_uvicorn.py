"""Real HAProxy and nginx in front of uvicorn with proxy_protocol_http: HTTP and WebSocket."""

from __future__ import annotations

import json
from pathlib import Path

from websockets.sync.client import connect as ws_connect

from l4lb.proxy_protocol import TLV, TLVType, build
from l4lb.trust.policy import ProxyPolicy
from tests.backend.servers import closed_by_peer, front_ends, http_get, uvicorn_server
from tests.support.peers import connect_from

CLIENTS = ["127.0.0.7", "127.0.0.8"]
POLICY = ProxyPolicy(mode="required", trusted=["127.0.0.1/32"], header_timeout=5)


def test_uvicorn_behind_haproxy_and_nginx(tmp_path: Path) -> None:
    with uvicorn_server(POLICY) as port, front_ends(tmp_path, port) as fronts:
        for name in ("haproxy-v1", "haproxy-v2", "nginx"):
            for ip in CLIENTS:
                with connect_from(ip, "127.0.0.1", fronts[name]) as s:
                    own = [ip, s.getsockname()[1]]
                    for _ in range(2):
                        info = http_get(s)
                        assert info["client"] == own, name
                        assert info["server"] == ["127.0.0.1", fronts[name]]
                        assert info["version"] == (2 if name == "haproxy-v2" else 1)
                    if name == "haproxy-v2":
                        assert info["unique_id"] == f"{ip}:{own[1]}"
        # HAProxy (accept-proxy) passes the authority TLV on: it reaches the scope extension.
        with connect_from("127.0.0.7", "127.0.0.1", fronts["haproxy-chain"]) as s:
            tlvs = [TLV(TLVType.AUTHORITY, b"shop.example")]
            s.sendall(build(2, ("192.0.2.5", 1234), ("127.0.0.1", 443), tlvs=tlvs))
            info = http_get(s)
            assert info["client"] == ["192.0.2.5", 1234]
            assert info["authority"] == "shop.example"
            assert info["unique_id"] == "192.0.2.5:1234"
        with connect_from("127.0.0.9", "127.0.0.1", port) as s:
            s.sendall(build(1, ("198.51.100.42", 1), ("127.0.0.1", port)))
            assert closed_by_peer(s)


def test_websocket_through_haproxy_and_nginx(tmp_path: Path) -> None:
    with uvicorn_server(POLICY) as port, front_ends(tmp_path, port) as fronts:
        for name in ("haproxy-v2", "nginx"):
            s = connect_from("127.0.0.7", "127.0.0.1", fronts[name])
            own = ["127.0.0.7", s.getsockname()[1]]
            with ws_connect(f"ws://127.0.0.1:{fronts[name]}/ws", sock=s, open_timeout=10) as ws:
                info = json.loads(ws.recv(timeout=10))
                assert info["client"] == own, name
                assert info["server"] == ["127.0.0.1", fronts[name]]
                ws.send("x")
                assert ws.recv(timeout=10) == "echo x"


def test_uvicorn_tls_passed_through_haproxy_and_nginx(tmp_path: Path) -> None:
    from tests.backend.servers import make_cert, server_context, tls_client

    cert, key = make_cert(tmp_path)
    with (
        uvicorn_server(POLICY, ssl=server_context(cert, key)) as port,
        front_ends(tmp_path, port) as fronts,
    ):
        for name in ("haproxy-v1", "haproxy-v2", "nginx"):
            s = connect_from("127.0.0.7", "127.0.0.1", fronts[name])
            own = ["127.0.0.7", s.getsockname()[1]]
            with tls_client(s, cert) as t:
                info = http_get(t)
                assert info["client"] == own, name
                assert info["scheme"] == "https"
