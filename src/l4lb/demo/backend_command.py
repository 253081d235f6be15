"""``l4lb demo-backend --listen HOST:PORT --proxy v1|v2``: one standalone demo backend."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from l4lb.balancer.logs import setup_logging
from l4lb.config.values import parse_hostport
from l4lb.demo.backend import DemoBackend


async def _serve(backend: DemoBackend) -> None:
    await backend.start()
    print(
        f"demo backend {backend.name} on {backend.listen}, requires PROXY v{backend.version}",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await backend.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="l4lb demo-backend",
        description="A backend that requires a PROXY header and answers with what it saw.",
    )
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument("--proxy", choices=["v1", "v2"], default="v2")
    parser.add_argument("--name", default=None, help="shown in answers (default: the address)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    try:
        host, port = parse_hostport(args.listen)
    except ValueError as err:
        print(f"l4lb demo-backend: --listen: {err}", file=sys.stderr)
        return 2
    setup_logging()
    backend = DemoBackend(args.name or args.listen, host, port, int(args.proxy[1]))
    try:
        asyncio.run(_serve(backend))
    except OSError as err:
        print(f"l4lb demo-backend: cannot listen on {args.listen}: {err.strerror}", file=sys.stderr)
        return 3
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0
