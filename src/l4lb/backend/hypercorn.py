"""PROXY protocol for hypercorn (asyncio): ``serve(app, config, policy=...)``.

    config = hypercorn.config.Config()
    config.bind = ["0.0.0.0:8000"]
    asyncio.run(serve(app, config, policy=ProxyPolicy(trusted=["10.0.0.0/8"])))

or, for several processes, ``run(config, workers=4, policy=...)`` with ``config.application_path``
set (``"myapp:app"``), or from the shell:

    L4LB_TRUSTED_PROXIES=10.0.0.0/8 python -m l4lb.backend.hypercorn myapp:app \\
        --bind 0.0.0.0:8000 --workers 4

hypercorn has no place to plug in a listener, so :func:`serve` does what hypercorn's asyncio
worker does (lifespan, graceful shutdown, ``max_requests``) with hypercorn's own parts
(``Lifespan``, ``TCPServer``, ``WorkerContext``), but opens the listeners with
:func:`l4lb.backend.asyncio.start_server`: each connection's header is decided first, then
hypercorn's ``TCPServer`` serves it, seeing the real client as the socket's peer, so
``scope["client"]`` is the real client for HTTP/1.1 keep-alive requests and WebSockets.
``config.certfile``/``keyfile`` terminate TLS right after the header (mode ``required``). QUIC
(HTTP/3) is refused: the PROXY protocol has no place in a QUIC datagram.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from random import randint
from typing import Any

from hypercorn.app_wrappers import ASGIWrapper, WSGIWrapper
from hypercorn.asyncio.lifespan import Lifespan
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.asyncio.worker_context import WorkerContext
from hypercorn.config import Config, Sockets
from hypercorn.utils import load_application, wrap_app

from l4lb.backend.asyncio import start_server
from l4lb.backend.environ import policy_from_env
from l4lb.trust.policy import PolicyError, ProxyPolicy

__all__ = ["main", "run", "serve"]


class _SocketView:
    """What hypercorn's ``TCPServer`` asks of ``get_extra_info("socket")``: the real addresses."""

    def __init__(self, peer: Any, sockname: Any) -> None:
        self.family = socket.AF_INET6 if ":" in str(peer[0]) else socket.AF_INET
        self._peer = peer
        self._sockname = sockname

    def getpeername(self) -> Any:
        return self._peer

    def getsockname(self) -> Any:
        return self._sockname


class _ProxiedWriter:
    """A ``StreamWriter`` whose ``"socket"`` is a :class:`_SocketView`; the rest is the writer's."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return _SocketView(
                self._writer.get_extra_info("peername"), self._writer.get_extra_info("sockname")
            )
        return self._writer.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)


async def serve(
    app: Any,
    config: Config,
    *,
    policy: ProxyPolicy | None = None,
    sockets: Sockets | None = None,
    shutdown_trigger: Callable[[], Awaitable[Any]] | None = None,
    mode: str | None = None,
) -> None:
    """Serve an ASGI (or WSGI) app as ``hypercorn.asyncio.serve`` does, reading PROXY first.

    ``policy`` None reads it from the environment (:mod:`l4lb.backend.environ`). Without a
    ``shutdown_trigger``, SIGINT and SIGTERM start a graceful shutdown.
    """
    if policy is None:
        policy = policy_from_env()
    if isinstance(app, ASGIWrapper | WSGIWrapper):
        wrapped: Any = app  # load_application's, already wrapped
    else:
        wrapped = wrap_app(app, config.wsgi_max_body_size, mode)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    handled: tuple[signal.Signals, ...] = ()
    if shutdown_trigger is None:
        stop = asyncio.Event()
        handled = (signal.SIGINT, signal.SIGTERM)
        for sig in handled:
            loop.add_signal_handler(sig, stop.set)
        shutdown_trigger = stop.wait

    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(wrapped, config, loop, lifespan_state)
    lifespan_task = loop.create_task(lifespan.handle_lifespan())
    await lifespan.wait_for_startup()
    if lifespan_task.done() and lifespan_task.exception() is not None:
        raise lifespan_task.exception()  # type: ignore[misc]

    if config.quic_bind:
        raise ValueError(
            "hypercorn quic_bind: QUIC (HTTP/3) cannot carry a PROXY header; remove quic_bind"
        )
    if sockets is None:
        sockets = config.create_sockets()
    max_requests = None
    if config.max_requests is not None:
        max_requests = config.max_requests + randint(0, config.max_requests_jitter)
    context = WorkerContext(max_requests)
    tasks: set[asyncio.Task[Any]] = set()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        await TCPServer(
            wrapped,
            loop,
            config,
            context,
            lifespan_state,
            reader,
            _ProxiedWriter(writer),  # type: ignore[arg-type]
        )

    servers = []
    tls = config.create_ssl_context() if config.ssl_enabled else None
    for secure, group in ((True, sockets.secure_sockets), (False, sockets.insecure_sockets)):
        for sock in group:
            server = await start_server(
                on_client,
                sock=sock,
                policy=policy,
                ssl=tls if secure else None,
                ssl_handshake_timeout=config.ssl_handshake_timeout if secure else None,
                backlog=config.backlog,
            )
            servers.append(server)
            host, port = sock.getsockname()[:2]
            scheme = "https" if secure else "http"
            await config.log.info(f"Running on {scheme}://{host}:{port} (PROXY protocol)")

    try:
        waiters = [asyncio.ensure_future(shutdown_trigger()), loop.create_task(_wait(context))]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
    finally:
        await context.terminated.set()
        for server in servers:
            server.close()
            await server.wait_closed()
        if tasks:
            await asyncio.wait(tasks, timeout=config.graceful_timeout)
        await lifespan.wait_for_shutdown()
        lifespan_task.cancel()
        await asyncio.gather(lifespan_task, return_exceptions=True)
        # Our handlers go before asyncio.run closes the loop: its close() shuts the wake-up pipe
        # first and removes the handlers after, and a signal in between (a supervisor's second
        # SIGTERM) printed "Exception ignored ... Bad file descriptor" with a traceback.
        for sig in handled:
            loop.remove_signal_handler(sig)


async def _wait(context: WorkerContext) -> None:
    await context.terminate.wait()  # max_requests reached


def _worker(config: Config, sockets: Sockets, policy: ProxyPolicy) -> None:
    # The supervisor's handlers are not for workers: until serve() sets the loop's own, a
    # SIGTERM ends the worker at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    app = load_application(config.application_path, config.wsgi_max_body_size)
    asyncio.run(serve(app, config, policy=policy, sockets=sockets))


def run(config: Config, *, workers: int = 1, policy: ProxyPolicy | None = None) -> int:
    """Run ``config.application_path`` in ``workers`` processes sharing the listening sockets.

    A worker that dies is replaced; SIGINT/SIGTERM stop them all. Returns the exit code.
    """
    if policy is None:
        policy = policy_from_env()
    sockets = config.create_sockets()
    context = multiprocessing.get_context("fork")
    stopping = False

    def start() -> multiprocessing.process.BaseProcess:
        process = context.Process(target=_worker, args=(config, sockets, policy))
        process.start()
        return process

    def stop_all(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    processes = [start() for _ in range(workers)]
    try:
        while not stopping:
            for index, process in enumerate(processes):
                process.join(0.2)
                if process.exitcode is not None and not stopping:
                    print(
                        f"l4lb hypercorn: worker {process.pid} exited ({process.exitcode}); "
                        "starting another",
                        file=sys.stderr,
                        flush=True,
                    )
                    processes[index] = start()
    finally:
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        for process in processes:
            process.join(config.graceful_timeout + 5)
            if process.is_alive():
                process.kill()
                process.join(5)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m l4lb.backend.hypercorn MODULE:APP --bind HOST:PORT --workers N``."""
    parser = argparse.ArgumentParser(
        prog="python -m l4lb.backend.hypercorn",
        description="Run an ASGI/WSGI app under hypercorn behind a PROXY balancer; the policy "
        "comes from L4LB_TRUSTED_PROXIES, L4LB_PROXY_MODE and L4LB_HEADER_TIMEOUT.",
    )
    parser.add_argument("app", metavar="MODULE:APP")
    parser.add_argument("--bind", action="append", default=[], metavar="HOST:PORT")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--config", metavar="FILE", help="a hypercorn config (TOML or Python)")
    args = parser.parse_args(argv)
    try:
        policy = policy_from_env()
    except PolicyError as err:
        print(f"l4lb hypercorn: {err}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"l4lb hypercorn: --workers {args.workers}: give 1 or more", file=sys.stderr)
        return 2
    try:
        config = Config.from_toml(args.config) if args.config else Config()
    except (OSError, ValueError) as err:  # a missing file, bad TOML
        print(f"l4lb hypercorn: --config {args.config}: {err}", file=sys.stderr)
        return 2
    if config.quic_bind:
        print(
            "l4lb hypercorn: quic_bind: QUIC (HTTP/3) cannot carry a PROXY header; remove it",
            file=sys.stderr,
        )
        return 2
    config.application_path = args.app
    if args.bind:
        config.bind = args.bind
    sys.path.insert(0, ".")
    try:
        load_application(config.application_path, config.wsgi_max_body_size)
    except Exception as err:  # NoAppError, an ImportError, an error in the app module
        print(f"l4lb hypercorn: cannot load {args.app!r}: {err}", file=sys.stderr)
        return 2
    return run(config, workers=args.workers, policy=policy)


if __name__ == "__main__":
    sys.exit(main())
