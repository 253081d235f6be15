"""The admin API: a small asyncio HTTP/1.1 server on ``[admin] bind`` (loopback by default).

Routes::

    GET  /                                              the live status page (HTML)
    GET  /status[?pretty]                               JSON: listeners, pools, backends
    GET  /metrics                                       Prometheus text format
    GET  /snapshot                                      raw counters and histograms (JSON)
    GET  /ready                                         readiness for an upstream balancer:
                                                        200, or 503 while a listener's pool
                                                        has no up backend or the node stops
    POST /pools/{pool}/backends/{address}/drain          no new connections, existing ones run on
    POST /pools/{pool}/backends/{address}/disable        out of rotation (and health checks ignored)
    POST /pools/{pool}/backends/{address}/enable         back in rotation
    POST /pools/{pool}/backends/{address}/add[?weight=N&max_conns=N&send_proxy=v2]
                                                        a new backend (IP:PORT), in rotation once
                                                        it passes its health checks (rise)
    POST /pools/{pool}/backends/{address}/remove        drain, then forget (API-added backends)
    POST /pools/{pool}/backends/{address}/set?weight=N&max_conns=N|none
                                                        change its weight and/or max_conns
    POST /reload                                        re-read the config file and apply it
    POST /drain                                         anycast: withdraw the VIPs, then stop

When ``[admin] token`` is set, every POST needs ``Authorization: Bearer <token>`` (401
otherwise). Reads are open, like HAProxy's stats page: bind it to loopback or a private
address. The server speaks just enough HTTP/1.1 for curl, browsers and Prometheus: bounded
request heads, keep-alive, Content-Length bodies (ignored), no chunked uploads.

Hostile clients: every wait is bounded (:class:`AdminTimeouts`: the head, a declared body, the
pause between keep-alive requests, a response the client does not read), at most
``_MAX_CLIENTS`` connections are served, and when they are all taken a new client gets the slot
of the keep-alive connection idle the longest (nginx and HAProxy reuse idle keep-alive
connections the same way). A ``Host`` that is neither an IP literal, a localhost name (loopback
or wildcard binds) nor one of ``[admin] hosts`` is refused with 421 before any route runs: a web
page whose name an attacker re-points at 127.0.0.1 (DNS rebinding) sends its own name there.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import inspect
import ipaddress
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from l4lb.observe import cluster, metrics, status_page
from l4lb.observe.control import MEMBERSHIP, BalancerControl, ClusterControl, Conflict, Control
from l4lb.observe.snapshot import Snapshot

if TYPE_CHECKING:
    from l4lb.balancer.runtime import Balancer

log = logging.getLogger("l4lb.admin")

ACTIONS = ("drain", "disable", "enable")
_MAX_HEAD = 16384
_MAX_BODY = 65536
_MAX_CLIENTS = 64
_SINGLETONS = ("host", "content-length", "authorization", "origin")
"""Headers that may appear once: two Content-Lengths or Hosts are how requests get smuggled."""


@dataclass(frozen=True, slots=True)
class AdminTimeouts:
    """How long the admin API waits for each part of an exchange, in seconds.

    ``head``: from the accept (or a later request's first byte) to the end of the request head,
    as HAProxy's ``timeout http-request``, so a client trickling bytes cannot hold a slot.
    ``body``: for a declared body to arrive in full (nginx's ``client_body_timeout``).
    ``idle``: between two requests on a keep-alive connection (HAProxy's ``http-keep-alive``).
    ``write``: for the client to take a response (nginx's ``send_timeout``).
    """

    head: float = 10.0
    body: float = 10.0
    idle: float = 30.0
    write: float = 10.0


class _Client:
    """One admin connection: idle (between keep-alive requests) or busy, and since when."""

    __slots__ = ("idle", "since", "writer")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.idle = False
        self.since = 0.0


class _HeadTimeout(Exception):
    """The request head did not complete within ``AdminTimeouts.head``."""


class AdminError(Exception):
    """A request the admin API refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Response:
    status: HTTPStatus
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def _json(status: HTTPStatus, doc: Any) -> Response:
    return Response(status, json.dumps(doc, indent=2).encode() + b"\n")


def _encode(doc: Any, pretty: bool = False) -> bytes:
    if pretty:
        return json.dumps(doc, indent=2).encode() + b"\n"
    return json.dumps(doc, separators=(",", ":")).encode()


def _error(status: HTTPStatus, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(
        status,
        json.dumps({"error": message, "status": status.value}).encode() + b"\n",
        headers=headers,
    )


class AdminServer:
    """Serves the admin API for one balancer until :meth:`aclose`.

    With ``unix`` (an abstract socket name starting with NUL) it serves on that Unix socket
    instead of ``bind``, to clients running as the same user (or root) only: how the worker
    processes of one balancer reach each other (:mod:`l4lb.observe.cluster`).
    """

    def __init__(
        self,
        control: Control,
        bind: str = "127.0.0.1:9100",
        token: str | None = None,
        unix: str | None = None,
        *,
        timeouts: AdminTimeouts = AdminTimeouts(),
        hosts: tuple[str, ...] = (),
    ) -> None:
        self.control = control
        self.host, self.port = split_bind(bind)
        self.requested_port = self.port
        self.token = token or None
        self.unix = unix
        self.timeouts = timeouts
        self.hosts = hosts
        self._server: asyncio.Server | None = None
        self._clients: dict[asyncio.Task[None], _Client] = {}

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def start(self) -> None:
        """Bind and start serving; raises OSError if the address cannot be bound."""
        if self.unix is not None:
            sock = cluster.listening_socket(self.unix)  # uvloop takes no abstract path
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=_MAX_HEAD)
            return
        server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=_MAX_HEAD, reuse_address=True
        )
        sockets = server.sockets
        if not sockets or sockets[0] is None:
            # Two workers binding at once: SO_REUSEADDR lets both bind, and the second listen()
            # fails; uvloop reports that to the loop's handler and leaves a closed server.
            server.close()
            raise OSError(errno.EADDRINUSE, f"cannot listen on {self.address}: address in use")
        self._server = server
        self.port = sockets[0].getsockname()[1]
        log.info("event=admin_listening url=http://%s/ pid=%d", self.address, os.getpid())

    async def snapshot(self) -> Snapshot:
        """A fresh snapshot from the control."""
        result = self.control.snapshot()
        return await result if inspect.isawaitable(result) else result

    def close(self) -> None:
        """Stop accepting and close open admin connections (their tasks then end by themselves)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for client in list(self._clients.values()):
            client.writer.close()

    async def aclose(self) -> None:
        """Stop accepting, close open admin connections and wait for their tasks."""
        self.close()
        tasks = list(self._clients)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=5.0)
            for task in late:
                task.cancel()

    # -- connection handling ---------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self.unix is not None and not _same_user(writer):
            writer.close()
            return
        if len(self._clients) >= _MAX_CLIENTS and not self._evict_idle():
            writer.close()  # a flood of admin connections must not take every fd
            return
        client = _Client(writer)
        self._clients[task] = client
        try:
            first = True
            while await self._one_request(reader, writer, client, first):
                first = False
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self._clients.pop(task, None)
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # a client that does not read: drop what is queued
            else:
                writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    def _evict_idle(self) -> bool:
        """Close the keep-alive connection idle the longest, for a new client; False if none."""
        idle = [(c.since, task) for task, c in self._clients.items() if c.idle]
        if not idle:
            return False
        _, task = min(idle, key=lambda pair: pair[0])
        client = self._clients.pop(task)
        client.writer.close()  # its task sees EOF and ends by itself
        return True

    async def _read_head(
        self, reader: asyncio.StreamReader, client: _Client, first: bool
    ) -> bytes | None:
        """The next request head; None when the client closed or stayed idle too long.

        A new connection has ``head`` seconds for its whole first head; a keep-alive connection
        may stay idle for ``idle`` seconds (it may give its slot up meanwhile), then has
        ``head`` seconds from its next request's first byte.
        """
        loop = asyncio.get_running_loop()
        got = b""
        try:
            async with asyncio.timeout(self.timeouts.head if first else self.timeouts.idle) as cm:
                client.idle, client.since = not first, loop.time()
                got = await reader.readexactly(1)
                client.idle = False
                if not first:
                    cm.reschedule(loop.time() + self.timeouts.head)
                return got + await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            if got or first:
                raise _HeadTimeout from None
            return None
        except asyncio.IncompleteReadError as err:
            if (got + err.partial).strip():
                raise
            return None

    async def _one_request(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: _Client,
        first: bool,
    ) -> bool:
        """Read one request and answer it; True to keep the connection for another."""
        try:
            head = await self._read_head(reader, client, first)
        except asyncio.LimitOverrunError:
            return await self._refuse(
                writer, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head over 16 KiB"
            )
        except _HeadTimeout:
            return await self._refuse(
                writer,
                HTTPStatus.REQUEST_TIMEOUT,
                f"request head not complete within {self.timeouts.head:g}s",
            )
        except asyncio.IncompleteReadError:
            return await self._refuse(writer, HTTPStatus.BAD_REQUEST, "incomplete request")
        if head is None:
            return False
        try:
            method, target, version, headers = parse_head(head)
            length = content_length(headers)
        except AdminError as err:
            return await self._refuse(writer, err.status, str(err))
        if headers.get("transfer-encoding"):
            return await self._refuse(
                writer, HTTPStatus.NOT_IMPLEMENTED, "chunked request bodies are not supported"
            )
        if length:
            try:
                async with asyncio.timeout(self.timeouts.body):
                    await reader.readexactly(length)
            except TimeoutError:
                message = (
                    f"request body of {length} bytes not received within {self.timeouts.body:g}s"
                )
                return await self._refuse(writer, HTTPStatus.REQUEST_TIMEOUT, message)
        connection = headers.get("connection", "").lower()
        keep = connection != "close" and (version == "HTTP/1.1" or connection == "keep-alive")
        try:
            response = await self.handle(method, target, headers)
        except AdminError as err:
            extra = (("WWW-Authenticate", 'Bearer realm="l4lb"'),)
            response = _error(
                err.status, str(err), extra if err.status == HTTPStatus.UNAUTHORIZED else ()
            )
        except Exception:
            log.exception("event=admin_request_failed method=%s target=%r", method, target)
            response = _error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error, see the log")
        await self._send(writer, response, keep, head_only=method == "HEAD")
        return keep

    async def _refuse(self, writer: asyncio.StreamWriter, status: HTTPStatus, message: str) -> bool:
        """Answer an error that ends the connection; False: it is not kept for another request."""
        await self._send(writer, _error(status, message), keep=False)
        return False

    async def _send(
        self, writer: asyncio.StreamWriter, response: Response, keep: bool, head_only: bool = False
    ) -> None:
        lines = [
            f"HTTP/1.1 {response.status.value} {response.status.phrase}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            "Cache-Control: no-store",
            "Connection: " + ("keep-alive" if keep else "close"),
            *(f"{name}: {value}" for name, value in response.headers),
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if not head_only:
            writer.write(response.body)
        async with asyncio.timeout(self.timeouts.write):
            await writer.drain()

    # -- routing -----------------------------------------------------------------------------

    async def handle(self, method: str, target: str, headers: dict[str, str]) -> Response:
        """Answer one request (also usable without a socket, e.g. in tests)."""
        if self.unix is None:
            self._check_host(headers.get("host", ""))
        split = urlsplit(target)
        path, query = split.path, parse_qs(split.query, keep_blank_values=True)
        parts = [unquote(p) for p in path.split("/")[1:]]
        if parts and parts[-1] == "" and len(parts) > 1:
            parts.pop()
        get = ("GET", "HEAD")
        routes: list[tuple[bool, tuple[str, ...], Callable[[], Awaitable[Response]]]] = [
            (parts == [""], get, self._page),
            (parts == ["status"], get, lambda: self._status("pretty" in query)),
            (parts == ["metrics"], get, self._metrics),
            (parts == ["snapshot"], get, self._raw_snapshot),
            (parts == ["ready"], get, self._ready),
            (parts == ["reload"], ("POST",), self._reload),
            (parts == ["drain"], ("POST",), self._drain),
        ]
        if len(parts) == 5 and parts[0] == "pools" and parts[2] == "backends":
            pool, address, action = parts[1], parts[3], parts[4]
            if action in MEMBERSHIP:
                params = _single(query)
                routes.append(
                    (True, ("POST",), lambda: self._membership(pool, address, action, params))
                )
            elif action not in ACTIONS:
                raise AdminError(
                    HTTPStatus.NOT_FOUND,
                    f"unknown action {action!r}: use one of {', '.join(ACTIONS + MEMBERSHIP)}",
                )
            else:
                routes.append((True, ("POST",), lambda: self._backend(pool, address, action)))
        for matches, methods, run in routes:
            if not matches:
                continue
            if method not in methods:
                raise AdminError(
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    f"{method} not allowed on {path}: use {' or '.join(methods)}",
                )
            if method == "POST":
                self._authorize(headers)
            return await run()
        raise AdminError(
            HTTPStatus.NOT_FOUND,
            f"no such resource {path!r}: try /, /status, /ready, /metrics, POST /reload or "
            "POST /pools/{pool}/backends/{address}/drain|disable|enable|add|remove|set",
        )

    def _check_host(self, host: str) -> None:
        """Refuse a ``Host`` that names something else than this admin API (DNS rebinding).

        A page at ``http://attacker.example:9100/`` whose name the attacker re-points at
        127.0.0.1 reaches a loopback admin API with ``Host`` and ``Origin`` both its own name,
        so the Origin check alone passes it. IP literals are always accepted (a rebinding page
        has a name; the port may differ behind an SSH tunnel); localhost names when the bind is
        loopback or a wildcard; and the ``[admin] hosts`` names. No ``Host`` at all (HTTP/1.0
        tools) comes from no browser and is accepted.
        """
        if not host:
            return
        name = host_name(host)
        if name is not None:
            if _is_ip(name) or name in {h.lower().rstrip(".") for h in self.hosts}:
                return
            bind = ipaddress.ip_address(self.host)
            local = bind.is_loopback or bind.is_unspecified
            if local and (name == "localhost" or name.endswith(".localhost")):
                return
        url = f"http://{self.address}/"
        raise AdminError(
            HTTPStatus.MISDIRECTED_REQUEST,
            f"Host {host[:100]!r} is not this admin API: use its address ({url}); names other "
            "than localhost are refused unless listed in [admin] hosts (a page whose DNS name "
            "was re-pointed here must not read or change the balancer)",
        )

    def _authorize(self, headers: dict[str, str]) -> None:
        # A web page the operator happens to visit may POST to a loopback address; browsers
        # name that page in Origin. Only the admin's own origin (or none: curl) may change state.
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != headers.get("host", ""):
            raise AdminError(
                HTTPStatus.FORBIDDEN,
                f"cross-origin request from {origin!r} refused: state changes come from "
                "curl or the admin's own origin",
            )
        if self.token is None:
            return
        given = headers.get("authorization", "")
        scheme, _, credential = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            credential.strip().encode(), self.token.encode()
        ):
            raise AdminError(
                HTTPStatus.UNAUTHORIZED,
                "this call changes state: send 'Authorization: Bearer <token>' "
                "with the [admin] token" + (" (the token given is wrong)" if given else ""),
            )

    async def _page(self) -> Response:
        return Response(HTTPStatus.OK, status_page.render(), "text/html; charset=utf-8")

    # The snapshot is taken on the event loop (a consistent reading); turning it into text,
    # which takes milliseconds per hundred backends, runs in a thread so the relay goes on.

    async def _status(self, pretty: bool = False) -> Response:
        doc = (await self.snapshot()).to_json()
        return Response(HTTPStatus.OK, await asyncio.to_thread(_encode, doc, pretty))

    async def _raw_snapshot(self) -> Response:
        doc = (await self.snapshot()).to_dict()
        return Response(HTTPStatus.OK, await asyncio.to_thread(_encode, doc))

    async def _ready(self) -> Response:
        ready, reasons = readiness(await self.snapshot())
        status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
        return _json(status, {"ready": ready, "reasons": reasons})

    async def _metrics(self) -> Response:
        snap = await self.snapshot()
        body = await asyncio.to_thread(metrics.render_snapshot, snap)
        return Response(HTTPStatus.OK, body, metrics.CONTENT_TYPE)

    async def _reload(self) -> Response:
        log.info("event=reload_requested source=admin_api")
        outcome = await self.control.reload()
        if outcome.ok:
            return _json(HTTPStatus.OK, {"reloaded": True, "summary": outcome.summary})
        return _json(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            {
                "reloaded": False,
                "error": "the new config is invalid; the running one is kept",
                "errors": list(outcome.errors),
            },
        )

    async def _drain(self) -> Response:
        try:
            withdrawn = self.control.drain()
        except LookupError as err:
            raise AdminError(HTTPStatus.CONFLICT, str(err.args[0] if err.args else err)) from err
        log.warning("event=admin_action action=drain withdrawn=%s", ",".join(withdrawn) or "-")
        return _json(HTTPStatus.OK, {"draining": True, "withdrawn": withdrawn})

    async def _membership(
        self, pool: str, address: str, action: str, params: dict[str, str]
    ) -> Response:
        try:
            result = self.control.membership(pool, address, action, params)
            doc = await result if inspect.isawaitable(result) else result
        except LookupError as err:
            raise AdminError(HTTPStatus.NOT_FOUND, str(err.args[0] if err.args else err)) from err
        except Conflict as err:
            raise AdminError(HTTPStatus.CONFLICT, str(err)) from err
        except ValueError as err:
            raise AdminError(HTTPStatus.BAD_REQUEST, str(err)) from err
        log.warning(
            "event=admin_action action=%s pool=%s backend=%s params=%s state=%s",
            action,
            pool,
            address,
            ",".join(f"{k}={v}" for k, v in params.items()) or "-",
            doc.get("state"),
        )
        return _json(HTTPStatus.OK, doc)

    async def _backend(self, pool: str, address: str, action: str) -> Response:
        try:
            result = self.control.backend_action(pool, address, action)
            state = await result if inspect.isawaitable(result) else result
        except LookupError as err:
            raise AdminError(HTTPStatus.NOT_FOUND, str(err.args[0] if err.args else err)) from err
        except Conflict as err:
            raise AdminError(HTTPStatus.CONFLICT, str(err)) from err
        log.warning(
            "event=admin_action action=%s pool=%s backend=%s state=%s", action, pool, address, state
        )
        return _json(HTTPStatus.OK, {"pool": pool, "backend": address, "state": state})


def readiness(snap: Snapshot) -> tuple[bool, list[str]]:
    """Whether an upstream balancer should send this node traffic, and why (or why not).

    Not ready while the node is stopping (a stop signal arrived: it drains) or while any
    listener's pool has no backend in state ``up`` (every connection there would fail).
    """
    reasons: list[str] = []
    if snap.stopping:
        reasons.append("stopping: a stop signal was received, the node is draining")
    pools = {p.name: p for p in snap.pools}
    for lst in snap.listeners:
        pool = pools.get(lst.pool)
        up = 0 if pool is None else sum(b.state == "up" for b in pool.backends)
        if up == 0:
            total = 0 if pool is None else len(pool.backends)
            reasons.append(f"listener {lst.name}: pool {lst.pool} has no up backend (0 of {total})")
    if reasons:
        return False, reasons
    return True, [f"{len(snap.listeners)} listener(s), each pool has an up backend"]


def _single(query: dict[str, list[str]]) -> dict[str, str]:
    """Query parameters given once each (``?weight=1&weight=5`` is ambiguous: refused)."""
    for key, given in query.items():
        if len(given) != 1:
            raise AdminError(HTTPStatus.BAD_REQUEST, f"parameter {key!r} given more than once")
    return {key: given[0] for key, given in query.items()}


def _same_user(writer: asyncio.StreamWriter) -> bool:
    """True when the Unix-socket peer runs as our user or as root (SO_PEERCRED)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.getuid())


def parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """Split a request head into method, target, version and lower-cased headers."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError as err:  # pragma: no cover - latin-1 decodes every byte
        raise AdminError(HTTPStatus.BAD_REQUEST, "undecodable request head") from err
    lines = text.split("\r\n")
    request = lines[0].split(" ")
    if len(request) != 3 or not request[2].startswith("HTTP/1."):
        raise AdminError(HTTPStatus.BAD_REQUEST, f"malformed request line {lines[0][:80]!r}")
    method, target, version = request
    if not target.startswith("/"):
        raise AdminError(HTTPStatus.BAD_REQUEST, f"request target must be a path, got {target!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise AdminError(HTTPStatus.BAD_REQUEST, f"malformed header line {line[:80]!r}")
        key = name.lower()
        if key in headers and key in _SINGLETONS:
            raise AdminError(HTTPStatus.BAD_REQUEST, f"more than one {name} header")
        headers[key] = value.strip()
    return method, target, version, headers


def content_length(headers: dict[str, str]) -> int:
    """The request's Content-Length: ASCII digits only (``str.isdigit`` accepts '²' and '٣')."""
    text = headers.get("content-length", "0")
    if not (text.isascii() and text.isdigit()) or len(text) > 9:
        raise AdminError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {text[:20]!r}")
    length = int(text)
    if length > _MAX_BODY:
        raise AdminError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"request body of {length} bytes is over the {_MAX_BODY} allowed",
        )
    return length


def host_name(host: str) -> str | None:
    """The name or address in a ``Host`` header, without port, lower case; None if malformed."""
    host = host.strip().lower()
    if host.startswith("["):
        inside, sep, rest = host[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return inside
    name, sep, port = host.partition(":")
    if sep and not (port.isascii() and port.isdigit()):
        return None
    return name.rstrip(".") or None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return "%" not in name


def split_bind(bind: str) -> tuple[str, int]:
    """``"127.0.0.1:9100"`` or ``"[::1]:9100"`` -> (host, port)."""
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"admin bind {bind!r} must be HOST:PORT (IPv6 as [::1]:9100)")
    return host.strip("[]"), int(port)


class AdminRuntime:
    """The admin API of one worker: started by :func:`attach`, following reloads and the stop.

    With one worker it serves ``[admin] bind`` with this worker's :class:`BalancerControl`.
    With ``workers = N`` each worker also serves a private socket, and whichever worker binds
    ``[admin] bind`` first answers for all (:class:`ClusterControl`); the others retry the
    bind every few seconds, so the API comes back if that worker is restarted.
    """

    RETRY = 2.0

    def __init__(self, balancer: Balancer) -> None:
        self.balancer = balancer
        self.local = BalancerControl(balancer)
        self.multi = balancer.config.workers > 1
        self.pid = os.getpid()
        self.supervisor = os.getppid()
        self.control: Control = (
            ClusterControl(self.local, self.supervisor, self.pid) if self.multi else self.local
        )
        self.public: AdminServer | None = None
        self.peer: AdminServer | None = None
        self._retry: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.stopped = False

    async def start(self) -> None:
        if self.multi:
            name = cluster.socket_name(self.supervisor, self.pid)
            self.peer = AdminServer(self.local, unix=name)
            try:
                await self.peer.start()
            except OSError as err:
                log.error("event=admin_peer_failed error=%r", err.strerror or str(err))
                self.peer = None
        await self.follow()
        self.balancer.on_reload.append(self._on_reload)
        self.balancer.on_stop.append(self._on_stop)

    async def follow(self) -> None:
        """Serve what ``[admin]`` says now (a new token applies in place)."""
        wanted = self.balancer.config.admin
        server = self.public
        if (
            wanted is not None
            and server is not None
            and split_bind(wanted.bind) == (server.host, server.requested_port)
        ):
            server.token = wanted.token or None
            server.hosts = wanted.hosts
            return
        if server is None and self._retry is not None and wanted is not None:
            return  # another worker serves it; the retry loop reads the new [admin] itself
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if server is not None:
            self.public = None
            await server.aclose()
        if wanted is not None and not self.stopped:
            await self._bind(quiet=False)

    async def _bind(self, quiet: bool) -> bool:
        wanted = self.balancer.config.admin
        if wanted is None or self.stopped:
            return True
        server = AdminServer(self.control, wanted.bind, wanted.token, hosts=wanted.hosts)
        try:
            await server.start()
        except OSError as err:
            if self.multi and err.errno == errno.EADDRINUSE:
                if not quiet:
                    log.info("event=admin_served_by_other_worker bind=%s", wanted.bind)
                if self._retry is None:
                    self._retry = self._spawn(self._retry_bind())
                return False
            log.error(
                "event=admin_bind_failed bind=%s error=%r", wanted.bind, err.strerror or str(err)
            )
            return True
        self.public = server
        return True

    async def _retry_bind(self) -> None:
        while not self.stopped:
            await asyncio.sleep(self.RETRY)
            if await self._bind(quiet=True):
                self._retry = None
                return

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _on_reload(self, balancer: Balancer) -> None:
        self._spawn(self.follow())

    def _on_stop(self, balancer: Balancer) -> None:
        # The public API serves on while connections drain, so an upstream balancer reading
        # /ready sees 503 (not a refused connection it may retry); it goes with the process.
        self.stopped = True
        if self._retry is not None:
            self._retry.cancel()
        if self.peer is not None:
            self.peer.close()
        self.peer = None


async def attach(balancer: Balancer) -> AdminRuntime:
    """Runtime extension hook: serve the admin API when the config has an ``[admin]`` table.

    Follows reloads (an added, changed or removed ``[admin]`` table). A bind that fails is
    logged, not fatal: the balancer keeps serving traffic.
    """
    runtime = AdminRuntime(balancer)
    await runtime.start()
    return runtime
