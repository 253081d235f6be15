"""``l4lb demo``: the balancer on an embedded config in front of two demo backends.

Everything runs in this one process: two :class:`~l4lb.demo.backend.DemoBackend` servers that
require PROXY v2, and the balancer (round robin, ``unique_id`` TLV, access log on stdout).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from l4lb.balancer.listener import BindError
from l4lb.balancer.logs import setup_logging
from l4lb.balancer.runtime import Balancer
from l4lb.config.loader import parse_config
from l4lb.config.schema import Config
from l4lb.config.values import format_hostport
from l4lb.demo.backend import DemoBackend

CONFIG = """\
workers = 1
drain_timeout = "2s"

[log]
access = "stdout"

[[listeners]]
name = "demo"
bind = "{bind}"
pool = "demo"

[pools.demo]
balance = "roundrobin"
send_proxy = "v2"
proxy_tlvs = ["unique_id", "authority", "alpn"]
tls_peek_timeout = "100ms"
backends = [
  {{ address = "{b1}" }},
  {{ address = "{b2}" }},
]
"""


def demo_config(host: str, port: int, backend_ports: tuple[int, int]) -> Config:
    """The embedded demo config for these ports."""
    text = CONFIG.format(
        bind=format_hostport(host, port),
        b1=format_hostport(host, backend_ports[0]),
        b2=format_hostport(host, backend_ports[1]),
    )
    return parse_config(text, source="<demo>")


def _instructions(url_host: str, port: int, backends: list[DemoBackend]) -> str:
    base = f"http://{url_host}:{port}/"
    lines = [
        "",
        f"l4lb demo: balancer on {url_host}:{port} -> "
        + ", ".join(f"{b.name} ({b.listen})" for b in backends),
        "Both backends require a PROXY v2 header and answer with what it told them.",
        "",
        "Try it:",
        f"  curl {base}                      # alternates between the two backends",
        f"  curl --interface 127.0.0.7 {base}  # the backends see 127.0.0.7 as the client",
        f"  printf 'hi\\n' | curl -s telnet://{url_host}:{port}  # plain text for non-HTTP",
        "",
        "One JSON access-log line per connection follows. Ctrl-C to stop.",
        "",
    ]
    return "\n".join(lines)


async def _run(host: str, port: int, backend_ports: tuple[int, int]) -> int:
    backends = [
        DemoBackend("backend-1", host, backend_ports[0], 2),
        DemoBackend("backend-2", host, backend_ports[1], 2),
    ]
    try:
        for b in backends:
            await b.start()
    except OSError as err:
        print(f"l4lb demo: cannot start a demo backend: {err.strerror}", file=sys.stderr)
        for b in backends:
            await b.close()
        return 3
    config = demo_config(host, port, (backends[0].port, backends[1].port))
    balancer = Balancer(config)
    try:
        balancer.start()
    except BindError as err:
        print(f"l4lb demo: {err.strerror} (try --port)", file=sys.stderr)
        for b in backends:
            await b.close()
        balancer.access_log.close()
        return 3
    bound = balancer.listeners["demo"].address
    url_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    print(_instructions(url_host, bound[1], backends), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await balancer.stop(2.0)
    for b in backends:
        await b.close()
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="l4lb demo", description="Run l4lb in front of two demo backends that need PROXY v2."
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to use")
    parser.add_argument("--port", type=int, default=8080, help="the balancer's port")
    parser.add_argument(
        "--backend-port",
        type=int,
        action="append",
        metavar="PORT",
        help="a demo backend's port (give it twice; default 9001 and 9002)",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    ports = args.backend_port or [9001, 9002]
    if len(ports) != 2:
        print("l4lb demo: give --backend-port exactly twice", file=sys.stderr)
        return 2
    setup_logging()
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_run(args.host, args.port, (ports[0], ports[1])))
    return uvloop.run(_run(args.host, args.port, (ports[0], ports[1])))
