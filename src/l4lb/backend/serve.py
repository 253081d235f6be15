"""``l4lb serve-asgi MODULE:APP``: run an ASGI app under uvicorn behind a PROXY-speaking balancer.

    l4lb serve-asgi examples.asgi_app:app --bind 127.0.0.1:8000 \\
        --accept-proxy required --trusted 127.0.0.1/32 --workers 4

With ``--workers N`` uvicorn runs N processes on the one listening socket (each rebuilds the
PROXY protocol class from the policy) and restarts any that dies.

uvicorn's own ``proxy_headers`` are off: the client address comes from the PROXY header of a
trusted peer only. TLS: terminate it at the balancer, or here after the header with
``--ssl-certfile``/``--ssl-keyfile`` when the balancer passes TLS through.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
from typing import Any, cast

from l4lb.backend.asyncio import check_tls_policy
from l4lb.trust.policy import Mode, PolicyError, ProxyPolicy

__all__ = ["main", "parse_bind"]


def parse_bind(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` as ``(host, port)``; ValueError says what is wrong."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"--bind {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8000")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"--bind {text!r}: write an IPv6 address in brackets, e.g. [::1]:8000")
    if not port_text.isascii() or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"--bind {text!r}: the port must be a number from 0 to 65535")
    return host, int(port_text)


def _ssl_context(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    """A server context for ``--ssl-certfile``/``--ssl-keyfile``; errors name the file."""
    if certfile is None:
        if keyfile is not None:
            raise ValueError("--ssl-keyfile needs --ssl-certfile")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(certfile, keyfile)
    except FileNotFoundError as err:
        raise ValueError(f"--ssl-certfile/--ssl-keyfile: no such file: {err.filename}") from None
    except ssl.SSLError as err:
        raise ValueError(
            f"--ssl-certfile {certfile!r}: not a usable certificate and key ({err.reason or err})"
        ) from None
    return context


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l4lb serve-asgi",
        description="Run an ASGI app under uvicorn, reading the real client address from the "
        "PROXY header (v1 or v2) that a trusted balancer sends.",
    )
    parser.add_argument("app", metavar="MODULE:APP", help="the ASGI application, e.g. mymod:app")
    parser.add_argument("--bind", default="127.0.0.1:8000", help="HOST:PORT to listen on")
    parser.add_argument(
        "--accept-proxy",
        default=Mode.REQUIRED.value,
        choices=[m.value for m in Mode],
        help="required: trusted peers must send a header, others are refused; optional: "
        "trusted peers may; off: no PROXY parsing (default: required)",
    )
    parser.add_argument(
        "--trusted",
        nargs="+",
        action="extend",
        default=[],
        metavar="CIDR",
        help="addresses of the balancers allowed to send a PROXY header (repeatable)",
    )
    parser.add_argument(
        "--header-timeout", type=float, default=5.0, help="seconds to wait for the header"
    )
    parser.add_argument(
        "--http", default="auto", help="uvicorn HTTP implementation: auto, h11 or httptools"
    )
    parser.add_argument("--ws", default="auto", help="uvicorn WebSocket implementation")
    parser.add_argument(
        "--ssl-certfile",
        metavar="PEM",
        help="terminate TLS here, after the PROXY header (the balancer passes TLS through)",
    )
    parser.add_argument("--ssl-keyfile", metavar="PEM", help="the certificate's private key")
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes sharing the socket (default 1)"
    )
    parser.add_argument("--log-level", default="info", help="uvicorn log level")
    parser.add_argument("--no-access-log", action="store_true", help="disable the access log")
    parser.add_argument("--app-dir", default=".", help="directory added to sys.path for the app")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        host, port = parse_bind(args.bind)
        policy = ProxyPolicy(
            mode=args.accept_proxy, trusted=args.trusted, header_timeout=args.header_timeout
        )
    except (ValueError, PolicyError) as err:
        print(f"l4lb serve-asgi: {err}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"l4lb serve-asgi: --workers {args.workers}: give 1 or more", file=sys.stderr)
        return 2
    if args.workers > 1 and args.ssl_certfile:
        print(
            "l4lb serve-asgi: --workers with --ssl-certfile is not supported (the TLS context "
            "does not cross to worker processes): terminate TLS at the balancer, or run one "
            "process per port",
            file=sys.stderr,
        )
        return 2
    if policy.mode is Mode.REQUIRED and not policy.networks:
        print(
            "l4lb serve-asgi: --accept-proxy required with no --trusted CIDR would refuse "
            "every connection; name the balancer's address, e.g. --trusted 127.0.0.1/32",
            file=sys.stderr,
        )
        return 2
    try:
        import uvicorn
    except ImportError:
        print(
            "l4lb serve-asgi: uvicorn is not installed (pip install 'l4lb[asgi]')", file=sys.stderr
        )
        return 2

    from l4lb.backend.uvicorn import proxy_protocol_http

    try:
        context = _ssl_context(args.ssl_certfile, args.ssl_keyfile)
        if context is not None:
            check_tls_policy(policy)
    except (OSError, ValueError) as err:
        print(f"l4lb serve-asgi: {err}", file=sys.stderr)
        return 2
    if args.app_dir and args.app_dir not in sys.path:
        sys.path.insert(0, args.app_dir)
    try:
        http = proxy_protocol_http(policy=policy, http=args.http, ssl=context)
    except Exception as err:  # uvicorn's import_from_string: an unknown --http name
        print(f"l4lb serve-asgi: --http {args.http!r}: {err}", file=sys.stderr)
        return 2
    from uvicorn.importer import import_from_string

    try:
        app = import_from_string(args.app)
    except Exception as err:  # a missing module, a typo in MODULE:APP, an error in the app
        print(
            f"l4lb serve-asgi: cannot load {args.app!r}: {type(err).__name__}: {err}",
            file=sys.stderr,
        )
        return 2
    settings: dict[str, Any] = {
        "host": host,
        "port": port,
        "http": cast("type[asyncio.Protocol]", http),  # a BufferedProtocol when TLS is ours
        "ws": args.ws,
        "proxy_headers": False,
        "log_level": args.log_level,
        "access_log": not args.no_access_log,
    }
    if args.workers > 1:
        # uvicorn's own path for workers: the parent binds and supervises (restarting a worker
        # that dies); each spawned worker loads the app by name and unpickles the protocol
        # class, which is rebuilt there from the policy.
        uvicorn.run(args.app, workers=args.workers, **settings)
        return 0
    config = uvicorn.Config(app, **settings)
    server = uvicorn.Server(config)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits on an app that cannot be imported
        return int(exc.code) if isinstance(exc.code, int) else 1
    return 0 if server.started else 1
