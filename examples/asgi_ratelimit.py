"""An ASGI app that logs and rate-limits by the real client address, behind a PROXY balancer.

Run it under uvicorn with the PROXY protocol required from the balancer at 127.0.0.1::

    l4lb serve-asgi examples.asgi_ratelimit:app --bind 127.0.0.1:8000 \\
        --accept-proxy required --trusted 127.0.0.1/32

or directly (same thing, from Python)::

    python examples/asgi_ratelimit.py --bind 127.0.0.1:8000 --trusted 127.0.0.1/32

Put HAProxy (``server app 127.0.0.1:8000 send-proxy-v2``), nginx (``proxy_protocol on;``) or
``l4lb run`` in front, or let curl play the balancer: ``curl --haproxy-protocol
http://127.0.0.1:8000/``. Each client gets ``RATE`` requests a second with bursts of ``BURST``;
over that it gets ``429 Too Many Requests``. Without the PROXY header every request would seem to
come from the balancer and share one budget; with it, each real client has its own.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

log = logging.getLogger("example.asgi")
if not log.handlers:  # uvicorn configures only its own loggers
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)

RATE = 5.0  # requests per second per client
BURST = 10.0
MAX_CLIENTS = 100_000  # bucket table bound: the least recently seen clients are forgotten first

_buckets: dict[str, tuple[float, float]] = {}  # client ip -> (tokens, last update)


def allow(ip: str, now: float | None = None) -> bool:
    """Take one token from ``ip``'s bucket; False when it is empty."""
    now = time.monotonic() if now is None else now
    tokens, last = _buckets.pop(ip, (BURST, now))
    tokens = min(BURST, tokens + (now - last) * RATE)
    allowed = tokens >= 1.0
    _buckets[ip] = (tokens - 1.0 if allowed else tokens, now)  # re-inserted: most recent last
    if len(_buckets) > MAX_CLIENTS:
        del _buckets[next(iter(_buckets))]
    return allowed


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] != "http":
        return
    client_ip, client_port = scope["client"] or ("-", 0)
    proxy = scope.get("extensions", {}).get("proxy_protocol") or {}
    via = "{}:{}".format(*proxy["upstream"]) if proxy.get("upstream") else "-"
    if allow(client_ip):
        status, body = 200, {"client": [client_ip, client_port], "via": via, "path": scope["path"]}
        if proxy.get("unique_id"):
            body["unique_id"] = proxy["unique_id"].decode("ascii", "replace")
    else:
        status, body = 429, {"error": "too many requests", "client": client_ip}
    log.info(
        '%s:%s via %s "%s %s" %d',
        client_ip,
        client_port,
        via,
        scope["method"],
        scope["path"],
        status,
    )
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


if __name__ == "__main__":
    import sys

    from l4lb.backend.serve import main

    sys.exit(main(["examples.asgi_ratelimit:app", *sys.argv[1:]]))
