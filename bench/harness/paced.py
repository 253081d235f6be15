"""Open-loop paced client: new connections at a fixed rate, latency of each, as JSON on stdout.

wrk2 is not packaged here and plain wrk is closed-loop (it waits for a response before sending the
next request, so a slow server lowers its own load and hides queueing). This client starts one
``GET /tiny`` on a new connection every 1/rate seconds whatever happened before, and measures each
from its *scheduled* start to the end of the response, so a stall counts against every request it
delays (no coordinated omission). Run it pinned to the generator core:

    python bench/harness/paced.py --port 8080 --rate 1000 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time

REQUEST = b"GET /tiny HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


async def one(
    loop: asyncio.AbstractEventLoop, port: int, scheduled: float, out: list[float]
) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        await loop.sock_connect(s, ("127.0.0.1", port))
        await loop.sock_sendall(s, REQUEST)
        got = 0
        while True:
            chunk = await loop.sock_recv(s, 4096)
            if not chunk:
                break
            got += len(chunk)
        if got:
            out.append(time.perf_counter() - scheduled)
    finally:
        s.close()


async def run(port: int, rate: float, duration: float, timeout: float) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors = 0
    tasks: set[asyncio.Task[None]] = set()

    async def guarded(scheduled: float) -> None:
        nonlocal errors
        try:
            await asyncio.wait_for(one(loop, port, scheduled, latencies), timeout)
        except (TimeoutError, OSError):
            errors += 1

    n = int(rate * duration)
    interval = 1.0 / rate
    start = time.perf_counter() + 0.01
    for i in range(n):
        scheduled = start + i * interval
        delay = scheduled - time.perf_counter()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        t = asyncio.create_task(guarded(scheduled))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)
    wall = time.perf_counter() - start
    latencies.sort()

    def pct(p: float) -> float | None:
        if not latencies:
            return None
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 3)

    return {
        "requests": n,
        "ok": len(latencies),
        "errors": errors,
        "wall_s": round(wall, 3),
        "rate": rate,
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": round(latencies[-1] * 1000, 3) if latencies else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--duration", type=float, default=5)
    ap.add_argument("--timeout", type=float, default=5)
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(run(args.port, args.rate, args.duration, args.timeout))))


if __name__ == "__main__":
    main()
