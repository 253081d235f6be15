"""Hold many idle connections open through a balancer, from a process of its own.

Opens ``--count`` connections to ``--port`` in batches; on each it makes one keep-alive request
(so any buffer the balancer allocates for traffic has been used once) and then leaves it idle.
Prints one JSON line when all are up, holds them until stdin closes or says ``close``, then closes
them all. Raises its own RLIMIT_NOFILE soft limit to the hard limit first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import sys

REQUEST = b"GET /tiny HTTP/1.1\r\nHost: bench\r\n\r\n"
BODY_END = b"\r\n\r\nok\n"


async def open_one(loop: asyncio.AbstractEventLoop, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        await loop.sock_connect(s, ("127.0.0.1", port))
        await loop.sock_sendall(s, REQUEST)
        buf = b""
        while not buf.endswith(BODY_END):
            chunk = await loop.sock_recv(s, 4096)
            if not chunk:
                raise ConnectionError("closed before the response ended")
            buf += chunk
        return s
    except BaseException:
        s.close()
        raise


async def run(port: int, count: int, batch: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    held: list[socket.socket] = []
    errors: list[str] = []
    for i in range(0, count, batch):
        n = min(batch, count - i)
        results = await asyncio.gather(
            *(asyncio.wait_for(open_one(loop, port), 10) for _ in range(n)), return_exceptions=True
        )
        for r in results:
            if isinstance(r, socket.socket):
                held.append(r)
            else:
                errors.append(f"{type(r).__name__}: {r}")
        if len(errors) > 50:
            break
    print(json.dumps({"open": len(held), "errors": len(errors), "first_error": errors[:1]}))
    sys.stdout.flush()
    await loop.run_in_executor(None, sys.stdin.readline)
    for s in held:
        s.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, default=9000)
    ap.add_argument("--batch", type=int, default=250)
    args = ap.parse_args()
    asyncio.run(run(args.port, args.count, args.batch))


if __name__ == "__main__":
    main()
