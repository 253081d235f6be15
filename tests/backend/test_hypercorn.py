"""l4lb.backend.hypercorn.serve in process: hypercorn's worker loop on PROXY-reading listeners."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from typing import Any

from hypercorn.config import Config
from websockets.sync.client import connect as ws_connect

from l4lb.backend.hypercorn import serve
from l4lb.proxy_protocol import TLV, TLVType, build, local_header
from l4lb.trust.policy import ProxyPolicy
from tests.backend.servers import CLIENT, DEST, LoopThread, asgi_app, closed_by_peer, http_get
from tests.backend.servers import policy as make_policy
from tests.support.peers import connect_from, free_port, wait_port


@contextlib.contextmanager
def hypercorn_server(policy: ProxyPolicy) -> Iterator[int]:
    port = free_port()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.graceful_timeout = 1
    loop = LoopThread()
    stop: list[asyncio.Event] = []

    async def run() -> None:
        stop.append(asyncio.Event())
        await serve(asgi_app, config, policy=policy, shutdown_trigger=stop[0].wait)

    done = asyncio.run_coroutine_threadsafe(run(), loop.loop)
    try:
        wait_port("127.0.0.1", port)
        yield port
    finally:
        loop.loop.call_soon_threadsafe(stop[0].set)
        done.result(10)  # a clean shutdown: serve() returns
        loop.close()


def test_serve_reads_the_header_for_keep_alive_and_websocket() -> None:
    with hypercorn_server(make_policy()) as port:
        with connect_from("127.0.0.1", "127.0.0.1", port) as s:
            tlvs = [TLV(TLVType.AUTHORITY, b"shop.example")]
            s.sendall(build(2, CLIENT, DEST, tlvs=tlvs))
            for _ in range(2):
                info: dict[str, Any] = http_get(s)
                assert info["client"] == list(CLIENT) and info["server"] == list(DEST)
        s = connect_from("127.0.0.1", "127.0.0.1", port)
        s.sendall(build(1, CLIENT, DEST))
        with ws_connect(f"ws://127.0.0.1:{port}/ws", sock=s, open_timeout=10) as ws:
            assert json.loads(ws.recv(timeout=10))["client"] == list(CLIENT)
            ws.send("x")
            assert ws.recv(timeout=10) == "echo x"
        with connect_from("127.0.0.9", "127.0.0.1", port) as s:  # untrusted: refused
            s.sendall(build(2, CLIENT, DEST) + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert closed_by_peer(s)
        with connect_from("127.0.0.1", "127.0.0.1", port) as s:  # trusted, no header: refused
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert closed_by_peer(s)


def test_local_header_uses_the_connection_addresses() -> None:
    # HAProxy's health checks (check-send-proxy with send-proxy-v2) send LOCAL.
    with hypercorn_server(make_policy()) as port, connect_from("127.0.0.1", "127.0.0.1", port) as s:
        s.sendall(local_header(2))
        assert http_get(s)["client"] == ["127.0.0.1", s.getsockname()[1]]
