"""A listening socket and its accept loop, feeding admitted connections to their pool.

The socket is raw and non-blocking (``SO_REUSEADDR`` + ``SO_REUSEPORT``, so several worker
processes can share the port); one ``add_reader`` callback accepts per wake-up what the kernel
says is queued (``TCP_INFO`` of the listening socket), ``ACCEPT_BATCH`` at most, never an
``accept()`` that meets an empty queue (see ``Listener._accept``). Options
the accepted sockets inherit (``TCP_NODELAY``) are set once on the listening socket, and
``defer_accept`` sets ``TCP_DEFER_ACCEPT`` there. At
``max_conns`` the listener stops watching the socket instead of accepting and dropping: new
clients wait in the kernel's backlog until a connection ends.

Counters for readers: ``active`` (admitted connections open now), ``total`` (admitted since
start), ``rejections`` (refused by admission, by reason: admission's own counter, kept across
reloads) and ``rejected`` (their sum).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any, Final, cast

import msgspec

from l4lb.balancer.admission import Address, Admission, Admitted, Rejected
from l4lb.balancer.connection import Connection
from l4lb.balancer.listen_socket import (
    BindError,
    OpenSocket,
    ensure_not_listening,
    open_listening_socket,
)
from l4lb.balancer.relay_contract import EndReason, Socket, StartRelay, socket_class
from l4lb.balancer.routes import RouteTable
from l4lb.config.schema import ListenerConfig

if TYPE_CHECKING:
    from l4lb.balancer.pool import Pool
    from l4lb.balancer.runtime import Balancer

__all__ = ["BindError", "Listener", "OpenSocket", "ensure_not_listening", "open_listening_socket"]

log = logging.getLogger("l4lb.listener")

# ``Final`` module constants: compiled, a plain module name is a dict look-up on every read
ACCEPT_BATCH: Final = 64
_EMFILE_PAUSE: Final = 0.1
_TCP_DEFER_ACCEPT: Final[int] = getattr(socket, "TCP_DEFER_ACCEPT", 9)
_SOCK_STREAM: Final = int(socket.SOCK_STREAM)
_RETRY_ACCEPT: Final = frozenset((errno.ECONNABORTED, errno.EINTR, errno.EPROTO))
"""accept() errors about one connection (it went away in the backlog): take the next one."""
_AF_INET: Final = int(socket.AF_INET)
_IPPROTO_TCP: Final = int(socket.IPPROTO_TCP)
_TCP_INFO: Final[int] = getattr(socket, "TCP_INFO", 11)
_TCPI_UNACKED: Final = 24
"""Offset of ``tcpi_unacked`` in ``struct tcp_info`` (after 8 bytes and 4 u32s); on a listening
socket the kernel puts its accept queue's length there."""
_TCPI_UNACKED_END: Final = _TCPI_UNACKED + 4
_LITTLE: Final = sys.byteorder == "little"


def _is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::")


class Listener:
    """One ``[[listeners]]`` entry at run time."""

    __slots__ = (
        "accepting",
        "active",
        "admission",
        "balancer",
        "config",
        "family",
        "local",
        "loop",
        "max_conns",
        "name",
        "route_counts",
        "routes",
        "running",
        "sock",
        "sock_class",
        "start_relay",
        "total",
    )

    def __init__(
        self,
        balancer: Balancer,
        config: ListenerConfig,
        sock: socket.socket,
        start_relay: StartRelay,
    ) -> None:
        """Raises ValueError (CidrError, PolicyError) for a trust policy that cannot be built."""
        self.balancer = balancer
        self.loop: asyncio.AbstractEventLoop = balancer.loop
        self.config = config
        self.name = config.name
        self.max_conns = config.max_conns
        self.start_relay = start_relay
        self.sock_class = socket_class(start_relay)
        """What accepted sockets are made of (the C type, unless the relay needs more)."""
        self.sock = sock
        self.active = 0
        self.total = 0
        self.routes = RouteTable.of(config)
        self.route_counts: Counter[str] = Counter()
        """Connections per route taken (a route's label, or ``default``), with routes."""
        self.running = False
        self.accepting = False
        bound = self.address
        self.local: tuple[str, int] | None = None if _is_wildcard(bound[0]) else bound
        self.family = int(sock.family)
        """The listening socket's address family, read once: ``socket.family`` is a Python
        property that converts to an IntEnum on every read (about 5k instructions)."""
        """The listener's own address when every accepted socket shares it (a specific IP)."""
        # Options accepted sockets inherit, set once here rather than on each of them: a
        # socket opened elsewhere (a worker's shared one, a test's) gets them too.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._set_defer_accept(config.defer_accept_s)
        self.admission = Admission(config, loop=self.loop, on_reject=self.on_reject)

    @property
    def address(self) -> tuple[str, int]:
        """The bound address (the real port when the config says port 0)."""
        name = self.sock.getsockname()
        return name[0], name[1]

    def _set_defer_accept(self, seconds: int) -> None:
        """``TCP_DEFER_ACCEPT``: the accept comes with the client's first bytes (or after
        ``seconds``, so a client waiting for a banner still gets in); 0 turns it off."""
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, _TCP_DEFER_ACCEPT, seconds)
        except OSError as err:
            if seconds:
                log.warning(
                    "event=defer_accept_unavailable listener=%s error=%r detail='accepting "
                    "at once'",
                    self.name,
                    err.strerror,
                )

    def start(self) -> None:
        self.running = True
        self._watch()

    def _watch(self) -> None:
        if self.running and not self.accepting and self.active < self.max_conns:
            self.accepting = True
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def _unwatch(self) -> None:
        if self.accepting:
            self.accepting = False
            self.loop.remove_reader(self.sock.fileno())

    def _accept(self) -> None:
        accept = self.sock._accept  # type: ignore[attr-defined]
        family = self.family
        make = self.sock_class
        admission = self.admission
        direct = admission.direct
        local = self.local
        # The wake-up says a connection is queued (the reader is level-triggered): accept it,
        # then ask the kernel how many more wait and accept those, not one more to meet an
        # empty queue. That accept's EAGAIN cost 5-6 µs a wake-up (3.5 of them in the kernel),
        # about 6k user-space instructions with its BlockingIOError: at a moderate rate, one per
        # connection. Connections that come after the count wake the loop again.
        due = 1
        asked = False
        for _ in range(ACCEPT_BATCH):
            if self.active >= self.max_conns:
                self._unwatch()
                return
            if due <= 0:
                if asked:
                    return
                asked = True
                due = self._backlog()
                if due <= 0:
                    return
            due -= 1
            try:
                # _accept(): socket.accept() without its per-call IntEnum conversions. It calls
                # accept4(SOCK_CLOEXEC); SOCK_NONBLOCK through ctypes would save the ioctl below
                # but costs more user-space instructions than it saves (docs/performance.md).
                fd, peer = cast("tuple[int, Any]", accept())
            except BlockingIOError:
                return
            except OSError as err:
                if err.errno in _RETRY_ACCEPT:
                    continue
                # Out of descriptors (EMFILE/ENFILE) or buffers: back off instead of spinning.
                log.error("event=accept_failed listener=%s error=%r", self.name, err.strerror)
                self._unwatch()
                self.loop.call_later(_EMFILE_PAUSE, self._watch)
                return
            sock = make(family, _SOCK_STREAM, 0, fd)
            sock.setblocking(False)  # TCP_NODELAY is inherited from the listening socket
            here = local
            if here is None:  # a wildcard bind: the address the client reached is per socket
                try:
                    name = sock.getsockname()
                except OSError:
                    sock.close()
                    continue
                here = (name[0], name[1])
            # an IPv6 peer is a 4-tuple; an IPv4 one is the (host, port) pair already
            client: Address = peer if family == _AF_INET else (peer[0], peer[1])
            if direct:  # no header to read, no client policy: admitted as it is
                self._admitted(sock, Admitted(client, here))
            else:
                admission.admit(sock, client, here, self._admitted)

    def _backlog(self) -> int:
        """How many connections wait in the listening socket's accept queue: on Linux,
        ``tcpi_unacked`` of a listening socket's ``TCP_INFO`` (``sk_ack_backlog``); where the
        kernel does not say, :data:`ACCEPT_BATCH` (accept until ``EAGAIN``)."""
        try:
            info = self.sock.getsockopt(_IPPROTO_TCP, _TCP_INFO, _TCPI_UNACKED_END)
        except OSError:
            return ACCEPT_BATCH
        if len(info) < _TCPI_UNACKED_END:
            return ACCEPT_BATCH
        at = _TCPI_UNACKED  # a native-endian u32, read byte by byte (no Struct call, no tuple)
        if _LITTLE:
            return info[at] | info[at + 1] << 8 | info[at + 2] << 16 | info[at + 3] << 24
        return info[at + 3] | info[at + 2] << 8 | info[at + 1] << 16 | info[at] << 24

    def _admitted(self, sock: Socket, admitted: Admitted) -> None:
        balancer = self.balancer
        pool = balancer.pools.get(self.config.pool)
        if pool is None:
            sock.close()
            self.admission.release(admitted)
            return
        self.active += 1
        self.total += 1
        conn = Connection(self, pool, sock, admitted, self.routes)
        balancer.connections.add(conn)
        if self.active >= self.max_conns:
            self._unwatch()
        conn.start()

    def pool_named(self, name: str) -> Pool | None:
        return self.balancer.pools.get(name)

    def connection_ended(self, conn: Connection, reason: EndReason, detail: str) -> None:
        """The connection is over: free its slot, log it."""
        self.active -= 1
        balancer = self.balancer
        balancer.connections.discard(conn)
        conn.admission.release(conn.admitted)
        if not self.accepting and self.running:
            self._watch()
        if balancer.access_log.enabled:  # off: no call into the (interpreted) runtime
            balancer.log_connection(conn, reason, detail)

    @property
    def rejections(self) -> Counter[str]:
        """Connections refused by admission, by reason."""
        return self.admission.rejections

    @property
    def rejected(self) -> int:
        return sum(self.admission.rejections.values())

    def on_reject(self, rejected: Rejected) -> None:
        """Admission refused (and counted) a connection: log a line."""
        self.balancer.log_rejection(self, rejected)

    def prepare(self, config: ListenerConfig) -> Admission | None:
        """The Admission a reloaded ``config`` needs (None: the current one serves); nothing
        changes yet. Raises ValueError for a trust policy that cannot be built."""
        old = self.config
        same = msgspec.structs.replace(
            config,
            pool=old.pool,
            max_conns=old.max_conns,
            routes=old.routes,
            default=old.default,
            tls_peek_timeout=old.tls_peek_timeout,
            monitor=old.monitor,
        )
        if same != old or config.deny_file:  # a deny_file's contents are re-read on reload
            return Admission(config, loop=self.loop, on_reject=self.on_reject)
        return None

    def reconfigure(self, config: ListenerConfig, admission: Admission | None) -> None:
        """Apply a reloaded config with the same bind and the Admission :meth:`prepare` built.

        Connections still waiting for their header finish with the old one, which is closed
        after its header timeout.
        """
        old = self.config
        self.config = config
        self.max_conns = config.max_conns
        if config.defer_accept_s != old.defer_accept_s:
            self._set_defer_accept(config.defer_accept_s)
        self.routes = RouteTable.of(config)
        self.start_relay = self.balancer.start_relay
        self.sock_class = socket_class(self.start_relay)
        if admission is not None:
            previous = self.admission
            self.admission = admission
            admission.adopt(previous)  # per-client counts survive the reload
            self.loop.call_later(old.proxy_header_timeout_s + 1.0, previous.close)
        if self.running:
            if self.active >= self.max_conns:
                self._unwatch()
            else:
                self._watch()

    def stop_accepting(self) -> None:
        """Close the listening socket; admitted connections run on."""
        self.running = False
        self._unwatch()
        self.sock.close()
        self.admission.close()
