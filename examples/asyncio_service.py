"""An asyncio TCP service that greets each client by its real address, behind a PROXY balancer.

Run it (the balancer connects from 127.0.0.1 and must send a PROXY header)::

    python examples/asyncio_service.py --bind 127.0.0.1:9000 --trusted 127.0.0.1/32

Try it without a balancer by sending a header yourself (bash)::

    exec 3<>/dev/tcp/127.0.0.1/9000
    printf 'PROXY TCP4 192.0.2.7 127.0.0.1 5555 9000\\r\\nhello\\n' >&3; head -2 <&3

which prints ``220 hello 192.0.2.7:5555`` and ``echo hello``.

It speaks first (like SMTP or FTP): the greeting goes out only once the header has been read and
accepted, and names the real client; then every line is echoed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

from l4lb.backend.asyncio import start_server
from l4lb.backend.serve import parse_bind
from l4lb.trust.policy import ProxyPolicy

log = logging.getLogger("example.asyncio")


async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    host, port = writer.get_extra_info("peername")  # the real client
    via = writer.get_extra_info("proxy_peer")  # the balancer
    header = writer.get_extra_info("proxy_header")
    version = f"v{header.version}" if header is not None else "no header"
    log.info("client %s:%s via %s:%s (%s)", host, port, via[0], via[1], version)
    writer.write(f"220 hello {host}:{port}\r\n".encode())
    try:
        while line := await reader.readline():
            writer.write(b"echo " + line)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(host: str, port: int, policy: ProxyPolicy) -> None:
    server = await start_server(on_client, host, port, policy=policy)
    log.info(
        "listening on %s:%s, PROXY %s from %s",
        host,
        port,
        policy.mode,
        ", ".join(map(str, policy.networks)) or "nobody",
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1:9000")
    parser.add_argument(
        "--accept-proxy", default="required", choices=["required", "optional", "off"]
    )
    parser.add_argument("--trusted", nargs="+", default=["127.0.0.1/32"])
    parser.add_argument("--header-timeout", type=float, default=5.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    host, port = parse_bind(args.bind)
    policy = ProxyPolicy(args.accept_proxy, args.trusted, args.header_timeout)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(host, port, policy))


if __name__ == "__main__":
    main()
