"""l4lb.backend.aiohttp in process: ProxyProtocolAppRunner with a site, over real sockets,
serving the example app (examples/aiohttp_app.py) that docs/backend.md shows."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from examples.aiohttp_app import make_app
from websockets.sync.client import connect as ws_connect

from l4lb.backend.aiohttp import ProxyProtocolAppRunner
from l4lb.proxy_protocol import build
from l4lb.trust.policy import ProxyPolicy
from tests.backend.servers import CLIENT, DEST, LoopThread, closed_by_peer, http_get, policy
from tests.support.peers import connect_from


@contextlib.contextmanager
def aiohttp_server(proxy_policy: ProxyPolicy) -> Iterator[tuple[int, Any]]:
    loop = LoopThread()

    async def start() -> tuple[web.AppRunner, web.TCPSite]:
        runner = ProxyProtocolAppRunner(make_app(), policy=proxy_policy)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, site

    runner, site = loop.call(start())
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield port, runner
    finally:
        loop.call(runner.cleanup())
        loop.close()


def _seen(info: dict[str, Any]) -> tuple[list[Any], int | None]:
    """The client the app saw, and the PROXY version it came with."""
    assert info["server"] == "aiohttp", info
    return info["client"], info["proxy_version"]


def test_runner_reads_the_header_for_keep_alive_and_websocket() -> None:
    with aiohttp_server(policy()) as (port, runner):
        with connect_from("127.0.0.1", "127.0.0.1", port) as s:
            s.sendall(build(2, CLIENT, DEST))
            for _ in range(2):
                assert _seen(http_get(s)) == (list(CLIENT), 2)
        s = connect_from("127.0.0.1", "127.0.0.1", port)
        s.sendall(build(1, CLIENT, DEST))
        with ws_connect(f"ws://127.0.0.1:{port}/ws", sock=s, open_timeout=10) as ws:
            assert _seen(json.loads(ws.recv(timeout=10))) == (list(CLIENT), 1)
            ws.send("x")
            assert ws.recv(timeout=10) == "echo x"
        with connect_from("127.0.0.9", "127.0.0.1", port) as s:  # untrusted: refused
            s.sendall(build(2, CLIENT, DEST) + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert closed_by_peer(s)
        assert dict(runner.server.rejections) == {"untrusted": 1}
        assert runner.server.requests_count >= 2  # aiohttp's own attribute, through the wrapper


def test_optional_mode_serves_a_direct_client_as_itself() -> None:
    with (
        aiohttp_server(policy("optional")) as (port, _runner),
        connect_from("127.0.0.8", "127.0.0.1", port) as s,
    ):
        own = s.getsockname()[1]
        assert _seen(http_get(s)) == (["127.0.0.8", own], None)
