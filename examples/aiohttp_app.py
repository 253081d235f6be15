"""An aiohttp app that answers with ``request.remote``, and echoes on a WebSocket.

Run it alone (one process), the policy from the environment::

    L4LB_TRUSTED_PROXIES=127.0.0.1/32 python examples/aiohttp_app.py --bind 127.0.0.1:8080

or in several processes under gunicorn, with aiohttp's worker made to read the header::

    L4LB_TRUSTED_PROXIES=127.0.0.1/32 gunicorn -w 2 -b 127.0.0.1:8080 \\
        -k l4lb.backend.gunicorn_aiohttp.ProxyWebWorker examples.aiohttp_app:app

then ``curl --haproxy-protocol http://127.0.0.1:8080/``: ``request.remote`` is the address the
PROXY header named, on every request of a keep-alive connection and in the WebSocket
(``proxy_version``: the header's version, 1 or 2; null for a direct client in optional mode).
"""

from __future__ import annotations

import argparse
import os

from aiohttp import WSMsgType, web

from l4lb.backend.aiohttp import run_app
from l4lb.backend.serve import parse_bind


def _client(request: web.Request) -> dict[str, object]:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport else None
    header = transport.get_extra_info("proxy_header") if transport else None
    return {
        "server": "aiohttp",
        "client": [request.remote, peer[1] if peer else None],
        "proxy_version": header.version if header is not None else None,
        "pid": os.getpid(),
    }


async def index(request: web.Request) -> web.Response:
    return web.json_response(_client(request))


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_json(_client(request))
    async for message in ws:
        if message.type is WSMsgType.TEXT:
            await ws.send_str("echo " + message.data)
    return ws


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/ws", websocket)
    return app


app = make_app()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1:8080", help="HOST:PORT")
    host, port = parse_bind(parser.parse_args().bind)
    run_app(app, host=host, port=port)
