"""One client connection from admission to close: peek, pick, connect, PROXY header, relay.

A :class:`Connection` is a state machine (:class:`State`)::

    NEW -> [PEEKING] -> CONNECTING (-> CONNECTING on a retry) -> RELAYING -> CLOSED
      any state -> CLOSED (refused, failed, closed early)

Every change of state goes through ``Connection._enter``, which also undoes what the state left
behind (its timer, the peek's reader, the connect watch). The client socket (non-blocking, as
the listener makes it) is the connection's until RELAYING, then the relay's. The PROXY header
is not a state of its own: it is built when the connect completes and goes to the backend in
the relay's first write.

Everything here runs from event-loop callbacks (no Task per connection): a raw non-blocking
``connect()`` watched with ``poller.wait_connected`` (one ``epoll_ctl``) and a deadline in
:class:`ConnectDeadlines` (one timer for all the connects of a loop), then the relay. Client
bytes are not read until a backend is connected (they wait in the kernel), so trying another
backend after a failed connect loses nothing. With ``authority``/``alpn`` TLVs
requested, or a listener with ``routes``, the ClientHello is peeked (``MSG_PEEK``, nothing
consumed) for up to ``tls_peek_timeout`` first; with routes, the pool is chosen when the peek
is done (:mod:`l4lb.balancer.routes`), the listener's pool being the default.
"""

from __future__ import annotations

import enum
import errno
import itertools
import logging
import os
import socket
import time
import weakref
from collections import Counter
from typing import TYPE_CHECKING, Final, Protocol

from l4lb.balancer import poller, splice, tls_peek, transparent
from l4lb.balancer.admission import Admitted
from l4lb.balancer.health import local_resource_error
from l4lb.balancer.relay_contract import (
    EndReason,
    NativeConn,
    Relay,
    Socket,
    StartRelay,
    reset_socket,
)
from l4lb.config.values import format_hostport
from l4lb.proxy_protocol import TLV, ProxyProtocolError, TLVType, build

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from l4lb.balancer.admission import Admission
    from l4lb.balancer.pool import Backend, Pool
    from l4lb.balancer.routes import RouteTable

log = logging.getLogger("l4lb.conn")

# ``Final`` module constants: compiled, a plain module name is a dict look-up on every read
_UID_PREFIX: Final = os.urandom(5).hex()
_uid_counter: Final = itertools.count(1)
_T_UNIQUE_ID: Final = int(TLVType.UNIQUE_ID)
_PEEK_SIZE: Final = 16384
_PEEK_RETRY: Final = 0.005
_STREAM_NONBLOCK: Final = int(socket.SOCK_STREAM) | getattr(socket, "SOCK_NONBLOCK", 0)
_AF_INET: Final = int(socket.AF_INET)
_AF_INET6: Final = int(socket.AF_INET6)
_EINPROGRESS: Final = errno.EINPROGRESS
_EISCONN: Final = errno.EISCONN
_EALREADY: Final = errno.EALREADY
_monotonic: Final = time.monotonic
_EPOLL: Final = poller.available()
_START_SPLICE: Final = splice.start_splice_relay
_EARLY: Final = 0.002
"""How early a timer may fire (uvloop rounds to milliseconds): not re-armed for that."""


def new_unique_id() -> str:
    """A connection id unique across processes and restarts (random prefix + counter)."""
    return f"{_UID_PREFIX}{next(_uid_counter):08x}"


class State(enum.Enum):
    """Where a connection is; see the module docstring for the transitions."""

    # Members are singletons compared by identity: hash them so too. Enum's own __hash__ is a
    # Python function (hash of the name), called twice per state change (the _NEXT look-up).
    __hash__ = object.__hash__

    NEW = "new"
    """Admitted, not started."""
    PEEKING = "peeking"
    """Waiting (up to ``tls_peek_timeout``) for a TLS ClientHello to peek at; nothing read."""
    CONNECTING = "connecting"
    """A backend ``connect()`` is in flight (one timer: ``connect_timeout``)."""
    RELAYING = "relaying"
    """The relay owns both sockets; it reports the end through ``relay_closed``."""
    CLOSED = "closed"
    """Accounted for and logged; nothing is open."""


# Python 3.11 reads a member off an Enum class (``State.CLOSED``) through EnumType.__getattr__'s
# slow attribute path, about 1,400 instructions a read (17 per connection before these; 3.12
# made it cheap): the methods below use these module constants instead.
NEW: Final = State.NEW
PEEKING: Final = State.PEEKING
CONNECTING: Final = State.CONNECTING
RELAYING: Final = State.RELAYING
CLOSED: Final = State.CLOSED
_ERROR: Final = EndReason.ERROR
_CONNECT_FAILED: Final = EndReason.CONNECT_FAILED

_NEXT: Final[dict[State, frozenset[State]]] = {
    State.NEW: frozenset((State.PEEKING, State.CONNECTING, State.CLOSED)),
    State.PEEKING: frozenset((State.CONNECTING, State.CLOSED)),
    State.CONNECTING: frozenset((State.CONNECTING, State.RELAYING, State.CLOSED)),
    State.RELAYING: frozenset((State.CLOSED,)),
    State.CLOSED: frozenset(),
}

_REFUSED: Final = frozenset(
    (
        EndReason.NO_BACKEND,
        EndReason.CONNECT_FAILED,
        EndReason.HEADER_ERROR,
        EndReason.SOURCE_FAILED,
        EndReason.NO_ROUTE,
    )
)
"""Ends before the relay that reset the client (it must not take a clean FIN for an answer)."""
_LOGGED: Final = frozenset(
    (EndReason.NO_BACKEND, EndReason.CONNECT_FAILED, EndReason.SOURCE_FAILED)
)


DEFAULT_ROUTE: Final = "default"
"""The access log's ``route`` of a connection no route matched, sent to the listener's pool."""


def set_keepalive(sock: Socket, idle: int, interval: int, count: int) -> None:
    """TCP keepalive: first probe after ``idle`` s of silence, then every ``interval`` s,
    the connection reset after ``count`` unanswered probes."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)


class Owner(Protocol):
    """What a connection needs from the listener that accepted it."""

    name: str
    loop: asyncio.AbstractEventLoop
    admission: Admission
    start_relay: StartRelay
    route_counts: Counter[str]
    """Connections per route taken (with routes only)."""

    def pool_named(self, name: str) -> Pool | None:
        """The running pool of that name (routes choose pools by name)."""

    def connection_ended(self, conn: Connection, reason: EndReason, detail: str) -> None:
        """The connection is closed: free its slot, log it (called once)."""


class Progress:
    """When a byte count last moved: the sweep's idle, client and server timeouts."""

    __slots__ = ("count", "since")

    def __init__(self, now: float) -> None:
        self.count = 0
        self.since = now

    def stalled(self, count: int, now: float, timeout: float) -> bool:
        """True when ``count`` has not moved for ``timeout`` s (a move restarts the clock)."""
        if count != self.count:
            self.count = count
            self.since = now
            return False
        return now - self.since >= timeout


class ConnectDeadlines:
    """The connections of one event loop connecting with the same ``connect_timeout``.

    They time out in the order they started, so one timer on the oldest serves them all: a
    ``call_later`` + ``cancel`` per connection cost about 1.4 µs on uvloop, adding and removing
    here about 0.1 µs. The timer is left to fire when the last connection leaves (it then
    finds nothing and stops), so a lone connection does not pay for a cancel either.
    """

    __slots__ = ("loop", "timeout", "timer", "waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.waiting: dict[Connection, float] = {}
        """Connection -> its deadline, oldest first (dicts keep insertion order)."""
        self.timer: asyncio.TimerHandle | None = None

    def add(self, conn: Connection) -> None:
        deadline = self.loop.time() + self.timeout
        self.waiting[conn] = deadline
        if self.timer is None:
            self.timer = self.loop.call_at(deadline, self._expire)

    def discard(self, conn: Connection) -> None:
        self.waiting.pop(conn, None)

    def _expire(self) -> None:
        self.timer = None
        waiting = self.waiting
        now = self.loop.time() + _EARLY
        while waiting:
            conn = next(iter(waiting))
            deadline = waiting[conn]
            if deadline > now:
                self.timer = self.loop.call_at(deadline, self._expire)
                return
            del waiting[conn]
            conn.deadlines = None
            try:
                conn._connect_timeout()
            except Exception:  # a bug in one connection's ending: the others still time out
                log.exception("event=connect_timeout_failed connection=%s", conn.unique_id)
        tables = loop_parts(self.loop).deadlines
        if tables.get(self.timeout) is self:
            del tables[self.timeout]


class LoopParts:
    """What the connections of one event loop share: its epoll set and connect deadlines."""

    __slots__ = ("deadlines", "loop", "watch")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.watch: poller.Poller | None = poller.for_loop(loop) if _EPOLL else None
        """The loop's epoll set (None where there is no epoll)."""
        self.deadlines: dict[float, ConnectDeadlines] = {}
        """By ``connect_timeout``, while connects with it are in flight."""

    def connect_deadlines(self, timeout: float) -> ConnectDeadlines:
        """The :class:`ConnectDeadlines` for ``timeout`` (made on first use)."""
        deadlines = self.deadlines.get(timeout)
        if deadlines is None:
            deadlines = self.deadlines[timeout] = ConnectDeadlines(self.loop, timeout)
        return deadlines


_PARTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopParts]
_PARTS = weakref.WeakKeyDictionary()
_last: LoopParts | None = None
"""The last loop's parts: a worker has one loop, and a WeakKeyDictionary look-up (a new weak
reference each time) cost about 0.5 µs per connection."""


def loop_parts(loop: asyncio.AbstractEventLoop) -> LoopParts:
    """The :class:`LoopParts` of ``loop`` (made on first use)."""
    global _last
    parts = _last
    if parts is not None and parts.loop is loop:
        return parts
    parts = _PARTS.get(loop)
    if parts is None:
        parts = _PARTS[loop] = LoopParts(loop)
    _last = parts
    return parts


def _loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8 or ::1): a connect to it finishes
    inside ``connect()``, the handshake running synchronously through the lo device."""
    return host.startswith("127.") or host == "::1"


class Connection(NativeConn):
    """An admitted client connection and everything the access log says about it."""

    __slots__ = (
        "_client_progress",
        "_progress",
        "_server_progress",
        "admission",
        "admitted",
        "alpn",
        "alpn_offers",
        "authority",
        "backend",
        "backend_sock",
        "client_sock",
        "connect_started",
        "deadlines",
        "detail",
        "failed",
        "listener",
        "loop",
        "on_state",
        "parts",
        "pool",
        "proxy_version",
        "relay",
        "route",
        "routes",
        "started",
        "state",
        "timer",
        "tried",
        "uid",
    )

    def __init__(
        self,
        listener: Owner,
        pool: Pool,
        sock: Socket,
        admitted: Admitted,
        routes: RouteTable | None = None,
        on_state: Callable[[State], None] | None = None,
    ) -> None:
        self.listener = listener
        self.on_state = on_state
        """Told every state entered, after the step (tests and debugging; usually None)."""
        self.routes = routes
        """The listener's routes: the pool is chosen after the peek (None: ``pool`` serves)."""
        self.route: str | None = None
        """The route taken (a route's label, or :data:`DEFAULT_ROUTE`), with routes only."""
        self.loop: asyncio.AbstractEventLoop = listener.loop
        self.pool = pool
        self.client_sock = sock
        self.admitted = admitted
        self.admission = listener.admission
        """The admission that let it in (a reload may give the listener a new one)."""
        self.state = NEW
        self.started = _monotonic()
        """``time.monotonic()`` at accept: the access log's duration, and (in the loop's clock,
        see :meth:`_born`) where the idle, client and server timeouts start."""
        # The sweep's Progress objects are made when it first looks (see ``progress``)
        self._progress: Progress | None = None
        self._client_progress: Progress | None = None
        self._server_progress: Progress | None = None
        self.backend: Backend | None = None
        self.backend_sock: Socket | None = None
        self.tried: tuple[Backend, ...] = ()
        self.bytes_from_client = 0
        self.bytes_to_client = 0
        self.relay: Relay | None = None
        self.timer: asyncio.TimerHandle | None = None
        """The timer of PEEKING (tls_peek_timeout)."""
        self.deadlines: ConnectDeadlines | None = None
        """Where CONNECTING waits for its connect_timeout."""
        self.parts = loop_parts(self.loop)
        self.proxy_version = 0
        self.authority: str | None = None
        self.alpn: bytes | None = None
        """The client's preferred ALPN protocol (its first offer)."""
        self.alpn_offers: tuple[bytes, ...] = ()
        self.detail = ""
        self.failed = _CONNECT_FAILED
        """How the last backend attempt failed (SOURCE_FAILED: its source, not the backend)."""
        self.connect_started = 0.0
        self.uid: str | None = None
        if admitted.pass_tlvs:
            for tlv in admitted.pass_tlvs:
                if tlv.type == _T_UNIQUE_ID:
                    self.uid = tlv.value.decode("utf-8", "backslashreplace")
                    break

    def _born(self) -> float:
        """The accept's time in the loop's clock (the sweep's), from :attr:`started`: one
        clock read per connection instead of two (``loop.time()`` is a uvloop method call)."""
        return self.loop.time() - (_monotonic() - self.started)

    # Made on the sweep's first look, as if made at accept: a short connection never meets a
    # sweep, and three objects fewer per connection save about 5k user-space instructions.
    @property
    def progress(self) -> Progress:
        """Bytes either way (``idle_timeout``)."""
        if self._progress is None:
            self._progress = Progress(self._born())
        return self._progress

    @property
    def client_progress(self) -> Progress:
        """Bytes from the client (``client_timeout``)."""
        if self._client_progress is None:
            self._client_progress = Progress(self._born())
        return self._client_progress

    @property
    def server_progress(self) -> Progress:
        """Bytes to the client (``server_timeout``)."""
        if self._server_progress is None:
            self._server_progress = Progress(self._born())
        return self._server_progress

    @property
    def unique_id(self) -> str:
        """The connection's id: the upstream's UNIQUE_ID TLV when one was passed on, else a new
        one, made on first use (for the header's TLV or the access log; most connections of
        a configuration with neither never need one)."""
        uid = self.uid
        if uid is None:
            uid = self.uid = new_unique_id()
        return uid

    def _enter(self, state: State) -> None:
        """Move to ``state``, undoing what the current state left behind."""
        old = self.state
        if state not in _NEXT[old]:
            raise RuntimeError(f"connection {self.unique_id}: no step {old.name} -> {state.name}")
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if old is PEEKING:
            with _suppress():
                self.loop.remove_reader(self.client_sock.fileno())
        elif old is CONNECTING:
            if self.deadlines is not None:
                self.deadlines.discard(self)
                self.deadlines = None
            # RELAYING comes from a finished connect: its watch is over already
            if self.backend_sock is not None and state is not RELAYING:
                self._stop_waiting(self.backend_sock)
        self.state = state
        if self.on_state is not None:
            self.on_state(state)

    # -- the steps -----------------------------------------------------------------------

    def start(self) -> None:
        routes = self.routes
        timeout = routes.peek_timeout if routes is not None else self.pool.tls_peek_timeout
        if timeout > 0:
            self._enter(PEEKING)
            self.loop.add_reader(self.client_sock.fileno(), self._peek)
            self.timer = self.loop.call_later(timeout, self._peek_done)
        elif routes is None or self._route():
            self.connect_next()

    def _peek(self) -> None:
        try:
            data = self.client_sock.recv(_PEEK_SIZE, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            self._peek_done()
            return
        if not data:
            self._peek_done()
            return
        result = tls_peek.parse_client_hello(data)
        if result is tls_peek.NEED_DATA and len(data) < _PEEK_SIZE:
            # Level-triggered readiness would spin on the peeked bytes: look again shortly.
            self.loop.remove_reader(self.client_sock.fileno())
            self.loop.call_later(_PEEK_RETRY, self._peek_again)
            return
        if isinstance(result, tls_peek.ClientHello):
            self.authority = result.server_name
            self.alpn = result.alpn[0] if result.alpn else None
            self.alpn_offers = result.alpn
        self._peek_done()

    def _peek_again(self) -> None:
        if self.state is PEEKING:
            self.loop.add_reader(self.client_sock.fileno(), self._peek)

    def _peek_done(self) -> None:
        if self.state is PEEKING and self._route():
            self.connect_next()

    def _route(self) -> bool:
        """With routes, choose the pool from the peeked ClientHello; False when refused."""
        routes = self.routes
        if routes is None:
            return True
        route = routes.match(self.authority, self.alpn_offers)
        if route is None:
            if routes.reject:
                self.finish(EndReason.NO_ROUTE, self._no_route())
                return False
            label = DEFAULT_ROUTE
        else:
            pool = self.listener.pool_named(route.pool)
            if pool is None:  # removed by a reload since this connection was admitted
                self.finish(EndReason.NO_BACKEND, f"route {route.label}: no pool {route.pool}")
                return False
            self.pool = pool
            label = route.label
        self.route = label
        self.listener.route_counts[label] += 1
        return True

    def _no_route(self) -> str:
        if self.authority is None and not self.alpn_offers:
            return "no route matches (no TLS ClientHello with SNI or ALPN)"
        offers = ",".join(a.decode("ascii", "replace") for a in self.alpn_offers)
        return f"no route matches sni={self.authority!r} alpn={offers!r}"

    def connect_next(self) -> None:
        """Pick a backend not tried yet and start connecting to it."""
        pool = self.pool
        ip = self.admitted.client[0]
        if ip.startswith("::ffff:") and "." in ip:
            ip = ip[7:]  # an IPv4 client on a dual-stack listener hashes as itself
        backend = pool.pick(ip, self.tried)
        if backend is None:
            if self.tried:
                why = self.detail or "every backend tried failed"
                self.finish(self.failed, why)
            else:
                why = f"no backend of pool {pool.name} is available"
                self.finish(EndReason.NO_BACKEND, why)
            return
        self._enter(CONNECTING)
        self.tried += (backend,)
        self.backend = backend
        backend.active += 1
        family = _AF_INET6 if ":" in backend.host else _AF_INET
        source = backend.source
        try:
            if source is None:
                # the client socket's class: the one the listener's relay takes
                sock = type(self.client_sock)(family, _STREAM_NONBLOCK)
            else:  # from the client's address (transparent) or a fixed one
                sock = transparent.open_socket(family, source, ip)
        except OSError as err:
            if source is None:
                backend.active -= 1
                self.backend = None
                self.finish(EndReason.CONNECT_FAILED, f"socket(): {err.strerror}")
            else:
                self._connect_failed(err.strerror or str(err), EndReason.SOURCE_FAILED)
            return
        keepalive = pool.keepalive
        if keepalive is not None:
            set_keepalive(sock, *keepalive)
            if len(self.tried) == 1:
                with _suppress():  # the client may be gone already: the relay will see it
                    set_keepalive(self.client_sock, *keepalive)
        self.backend_sock = sock  # TCP_NODELAY: the relay's (uvloop sets it on its transports)
        self.connect_started = _monotonic()
        address = (backend.host, backend.port)
        code = sock.connect_ex(address)
        if code == 0:
            self._connected()
        elif code == _EINPROGRESS:
            if _loopback(backend.host):
                # Connected already (see _loopback): a second connect() says so (0) without
                # a wake-up, and the PROXY header leaves in this callback instead of after
                # another turn of the loop (measured: -80 µs median latency, -5k instructions
                # per connection; docs/performance.md, issue 16 fourth round). EALREADY: still
                # in progress, watched as usual.
                code = sock.connect_ex(address)
                if code == 0 or code == _EISCONN:
                    self._connected()
                    return
                if code != _EALREADY:  # refused: the error is consumed, SO_ERROR says 0
                    self._connect_failed(os.strerror(code), code=code)
                    return
            parts = self.parts
            watch = parts.watch
            if watch is not None:
                watch.wait_connected(sock, self._on_writable)
            else:
                poller.wait_connected(self.loop, sock, self._on_writable)
            self.deadlines = parts.connect_deadlines(pool.connect_timeout)
            self.deadlines.add(self)
        else:
            self._connect_failed(os.strerror(code), code=code)

    def _on_writable(self) -> None:
        sock = self.backend_sock
        if self.state is not CONNECTING or sock is None:
            return
        watch = self.parts.watch
        if watch is not None and watch.connected_cleanly(sock):
            self._connected()
            return
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._connect_failed(os.strerror(err), code=err)
        else:
            self._connected()

    def _stop_waiting(self, sock: Socket) -> None:
        watch = self.parts.watch
        if watch is not None:
            watch.stop_waiting(sock)
        else:
            poller.stop_waiting(self.loop, sock)

    def _connect_timeout(self) -> None:
        why = f"connect timeout after {self.pool.connect_timeout:g}s"
        backend = self.backend
        if backend is not None and backend.source is transparent.CLIENT:
            client = self.admitted.client[0]
            why += (
                f" from the client's address {client}: no reply came back (the backend's "
                "replies to the client do not reach this host: the return route or the ip rule "
                "is missing; docs/transparent.md)"
            )
            self._connect_failed(why, EndReason.SOURCE_FAILED)
            return
        self._connect_failed(why)

    def _connect_failed(
        self, why: str, reason: EndReason = EndReason.CONNECT_FAILED, code: int = 0
    ) -> None:
        backend = self.backend
        assert backend is not None
        self.failed = reason
        sock = self.backend_sock
        if sock is not None:
            self._stop_waiting(sock)
            sock.close()
            self.backend_sock = None
        backend.active -= 1
        self.backend = None
        self.detail = f"{backend.address}: {why}"
        log.warning(
            "event=connect_failed listener=%s pool=%s backend=%s client=%s error=%r attempt=%d",
            self.listener.name,
            self.pool.name,
            backend.address,
            format_hostport(*self.admitted.client[:2]),
            why,
            len(self.tried),
        )
        # a refused bind (no socket) or a local resource error is this host's trouble, and says
        # nothing of the backend
        if sock is not None and not local_resource_error(code):
            self.pool.connect_result(backend, False, why)
        if self.state is CLOSED:
            return
        if len(self.tried) <= self.pool.retries:
            self.connect_next()
        else:
            self.finish(reason, self.detail)

    def _connected(self) -> None:
        backend = self.backend
        sock = self.backend_sock
        assert backend is not None and sock is not None
        backend.connected(_monotonic() - self.connect_started)
        self.pool.connect_result(backend, True)
        if self.state is not CONNECTING:
            return
        try:
            first = self.header(backend.proxy_version)
        except ProxyProtocolError as err:
            self.finish(EndReason.HEADER_ERROR, str(err))
            return
        self.proxy_version = backend.proxy_version
        self._enter(RELAYING)  # the sockets are the relay's from here on
        start = self.listener.start_relay
        if start is _START_SPLICE:
            # the default relay, called as C code rather than through the callable; both
            # sockets are non-blocking (the listener's setblocking, the connect's
            # SOCK_NONBLOCK), so its two gettimeout() checks are skipped
            self.relay = splice.start_nonblocking(self.loop, self.client_sock, sock, first, self)
        else:
            self.relay = start(self.loop, self.client_sock, sock, first, self)

    def header(self, version: int) -> bytes:
        """The PROXY header for this connection, or b"" when the backend gets none."""
        if version == 0:
            return b""
        admitted = self.admitted
        if version == 1:
            return build(1, admitted.client, admitted.destination)
        pool = self.pool
        if not (admitted.pass_tlvs or pool.adds_tlvs):
            # the usual header, addresses only: no list, no keyword arguments
            return build(2, admitted.client, admitted.destination)
        tlvs: list[TLV] = list(admitted.pass_tlvs)
        if pool.tlv_unique_id and not any(t.type == _T_UNIQUE_ID for t in tlvs):
            tlvs.append(TLV(_T_UNIQUE_ID, self.unique_id.encode()))
        if pool.tlv_authority and self.authority:
            tlvs.append(TLV(TLVType.AUTHORITY, self.authority.encode()))
        if pool.tlv_alpn and self.alpn:
            tlvs.append(TLV(TLVType.ALPN, self.alpn))
        if pool.tlv_noop:
            tlvs.append(TLV(TLVType.NOOP, b""))
        return build(2, admitted.client, admitted.destination, tlvs=tlvs, crc32c=pool.tlv_crc32c)

    # -- the end -------------------------------------------------------------------------

    def relay_closed(self, reason: EndReason) -> None:
        """Called once by the relay when both sockets are closed."""
        self.finish(reason, self.detail if reason is _ERROR else "")

    def close(self, reason: EndReason) -> None:
        """End now (idle timeout, shutdown), whatever state the connection is in."""
        state = self.state
        if state is CLOSED:
            return
        if state is RELAYING:
            if self.relay is not None:
                self.relay.close(reason)  # it reports back through relay_closed
            return
        self.finish(reason)

    def finish(self, reason: EndReason, detail: str = "") -> None:
        """Account for the connection's end, once: counters, admission slot, access log."""
        if self.state is CLOSED:
            return
        relayed = self.state is RELAYING
        self._enter(CLOSED)
        self.relay = None  # it points back at us: no cycle left for the cyclic GC to find
        if not relayed:
            # Never relayed: the client socket is still ours to close (with a RST when refused).
            if reason in _REFUSED:
                reset_socket(self.client_sock)
            self.client_sock.close()
            if reason in _LOGGED:
                log.warning(
                    "event=%s listener=%s pool=%s client=%s detail=%r",
                    reason,
                    self.listener.name,
                    self.pool.name,
                    format_hostport(*self.admitted.client[:2]),
                    detail,
                )
            if self.backend_sock is not None:
                self.backend_sock.close()
                self.backend_sock = None
        backend = self.backend
        if backend is not None:
            backend.active -= 1
            backend.bytes_in += self.bytes_from_client
            backend.bytes_out += self.bytes_to_client
        self.listener.connection_ended(self, reason, detail)


class _suppress:
    """``contextlib.suppress(OSError, ValueError)`` without the generator (cheap, on close)."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, tp: object, value: object, tb: object) -> bool:
        return tp is not None and isinstance(value, OSError | ValueError)
