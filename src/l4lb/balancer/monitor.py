"""Per-listener monitor ports, as HAProxy's ``monitor-uri`` with ``monitor fail``.

A listener with ``monitor = "127.0.0.1:8405"`` gets a tiny HTTP server there: any ``GET``
(``HEAD``, or ``OPTIONS``: what a bare ``option httpchk`` sends) answers ``200`` while the
listener's pool has a backend ``up`` and the node is not stopping, ``503`` otherwise, with a
one-line body saying why. An upstream balancer checks one service this way (``option httpchk``
on ``check port 8405``), where ``GET /ready`` on the admin port speaks for the whole node.

Each answer ends the connection (``Connection: close``); a request head must arrive within
:data:`HEAD_TIMEOUT` and fit in :data:`MAX_HEAD`, else the client gets ``408``/``431``. The port
serves on through a graceful stop (answering ``503``: the node drains) and goes with the
process; a reload opens, moves or closes monitors as the new file says. A port that cannot be
bound is logged (``event=monitor_bind_failed``), never fatal: the upstream then sees the
service down, which is the safe side. With ``workers > 1`` every worker binds the port
(``SO_REUSEPORT``) and answers from its own view, as each runs its own health checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING

from l4lb.balancer.listener import BindError, open_listening_socket
from l4lb.balancer.pool import BackendState
from l4lb.config.values import format_hostport

if TYPE_CHECKING:
    from l4lb.balancer.runtime import Balancer

log = logging.getLogger("l4lb.monitor")

HEAD_TIMEOUT = 5.0
MAX_HEAD = 8192
_MAX_CLIENTS = 64


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a monitor port answers now."""

    ready: bool
    reason: str

    @property
    def status(self) -> HTTPStatus:
        return HTTPStatus.OK if self.ready else HTTPStatus.SERVICE_UNAVAILABLE


def verdict(balancer: Balancer, listener: str) -> Verdict:
    """Whether an upstream should send ``listener`` traffic now, and why (or why not)."""
    if balancer.draining or balancer.stopping:
        return Verdict(False, "stopping: a stop signal was received, the node is draining")
    lst = balancer.listeners.get(listener)
    if lst is None:
        return Verdict(False, f"listener {listener} is not running")
    pool = balancer.pools.get(lst.config.pool)
    if pool is None:
        return Verdict(False, f"listener {listener}: pool {lst.config.pool} does not exist")
    up = sum(b.state is BackendState.UP for b in pool.backends)
    total = len(pool.backends)
    if up == 0:
        return Verdict(
            False, f"listener {listener}: pool {pool.name} has no up backend (0 of {total})"
        )
    return Verdict(True, f"listener {listener}: pool {pool.name} has {up} of {total} backends up")


class MonitorServer:
    """The monitor port of one listener."""

    def __init__(self, balancer: Balancer, listener: str, bind: tuple[str, int]) -> None:
        self.balancer = balancer
        self.listener = listener
        self.bind = bind
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind and serve; raises :class:`BindError` when the port cannot be bound."""
        sock = open_listening_socket(*self.bind, backlog=128)
        try:
            self._server = await asyncio.start_server(self._serve, sock=sock, limit=MAX_HEAD)
        except BaseException:
            sock.close()
            raise
        log.info(
            "event=monitor_listening listener=%s bind=%s",
            self.listener,
            format_hostport(*self.bind),
        )

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._clients):
            task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._clients) >= _MAX_CLIENTS or task is None:
            writer.close()
            return
        self._clients.add(task)
        try:
            status, body = await self._answer(reader)
            head = (
                f"HTTP/1.1 {status.value} {status.phrase}\r\n"
                "Content-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + body)
            async with asyncio.timeout(HEAD_TIMEOUT):
                await writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[HTTPStatus, bytes]:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            return HTTPStatus.REQUEST_TIMEOUT, b"request head not complete in time\n"
        except asyncio.LimitOverrunError:
            return HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, b"request head too large\n"
        except asyncio.IncompleteReadError as err:
            if not err.partial.strip():  # a TCP check: connect and close
                raise ConnectionResetError from None
            return HTTPStatus.BAD_REQUEST, b"incomplete request\n"
        method, _, rest = head.partition(b" ")
        if not rest or b"HTTP/" not in head.split(b"\r\n", 1)[0]:
            return HTTPStatus.BAD_REQUEST, b"expected an HTTP request: GET / HTTP/1.1\n"
        if method not in (b"GET", b"HEAD", b"OPTIONS"):
            return HTTPStatus.METHOD_NOT_ALLOWED, b"use GET\n"
        now = verdict(self.balancer, self.listener)
        body = ("ready: " if now.ready else "not ready: ") + now.reason + "\n"
        return now.status, b"" if method == b"HEAD" else body.encode()


class Monitors:
    """The monitor ports of a balancer's listeners, following reloads (see the module doc)."""

    def __init__(self, balancer: Balancer) -> None:
        self.balancer = balancer
        self.servers: dict[str, MonitorServer] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def follow(self) -> None:
        """Serve what the listeners' ``monitor`` keys say now."""
        wanted = {
            lc.name: lc.monitor_addr
            for lc in self.balancer.config.listeners
            if lc.monitor_addr is not None
        }
        for name, server in list(self.servers.items()):
            if wanted.get(name) != server.bind:
                server.close()
                del self.servers[name]
        for name, bind in wanted.items():
            if name in self.servers or self.balancer.stopping:
                continue
            server = MonitorServer(self.balancer, name, bind)
            try:
                await server.start()
            except (BindError, OSError) as err:
                log.error(
                    "event=monitor_bind_failed listener=%s bind=%s error=%r detail=%r",
                    name,
                    format_hostport(*bind),
                    err.strerror or str(err),
                    "the upstream sees this service down",
                )
                continue
            self.servers[name] = server

    def _on_reload(self, balancer: Balancer) -> None:
        task = balancer.loop.create_task(self.follow())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def attach(balancer: Balancer) -> Monitors:
    """Runtime extension hook: serve the listeners' monitor ports, following reloads."""
    monitors = Monitors(balancer)
    await monitors.follow()
    balancer.on_reload.append(monitors._on_reload)
    return monitors
