"""PROXY protocol for asyncio servers: read the header, then hand the connection to the app.

Two entry points, one mechanism:

* :func:`start_server` is :func:`asyncio.start_server` with a ``policy``: the callback runs only
  once the :class:`~l4lb.trust.policy.HeaderGate` accepts, and ``writer.get_extra_info()``
  answers ``"peername"`` with the real client, ``"sockname"`` with the original destination,
  ``"proxy_header"`` with the :class:`~l4lb.proxy_protocol.ProxyHeader` (None without one) and
  ``"proxy_peer"`` with the balancer's own address.
* :class:`ProxyProtocolFactory` wraps any protocol factory for ``loop.create_server``: a small
  protocol reads the header, then ``transport.set_protocol()`` switches to the application's
  protocol, which gets a :class:`ProxiedTransport` and the bytes that followed the header.

The application's protocol is created only after the decision, so a server-speaks-first protocol
(SMTP, FTP, MySQL) sends its greeting only after the header has been read and accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl as ssl_module
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, cast

from l4lb.config.values import format_hostport
from l4lb.trust.policy import Decision, HeaderGate, Mode, ProxyPolicy

__all__ = [
    "ExactHeaderProtocol",
    "HeaderProtocol",
    "ProxiedTransport",
    "ProxyProtocolFactory",
    "check_tls_policy",
    "deliver",
    "hand_over",
    "start_server",
]

log = logging.getLogger("l4lb.backend")

ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]


class ProxiedTransport(asyncio.Transport):
    """A transport that reports the real addresses of a proxied connection.

    Everything else is the underlying transport's. ``get_extra_info("socket")`` is None: the raw
    socket's ``getpeername()`` would name the balancer, and code that asks for it (uvicorn does)
    falls back to ``"peername"``. ``"proxy_socket"`` still gives the socket to those who need it.
    """

    __slots__ = ("_decision", "_on_set_protocol", "_transport")

    def __init__(
        self,
        transport: asyncio.Transport,
        decision: Decision,
        on_set_protocol: Callable[[asyncio.BaseProtocol], None] | None = None,
    ) -> None:
        super().__init__()
        self._transport = transport
        self._decision = decision
        self._on_set_protocol = on_set_protocol

    @property
    def decision(self) -> Decision:
        """The header decision this connection was accepted with."""
        return self._decision

    @property
    def transport(self) -> asyncio.Transport:
        """The underlying transport."""
        return self._transport

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        decision = self._decision
        if name == "peername":
            return decision.client
        if name == "sockname":
            return decision.destination
        if name == "proxy_header":
            return decision.header
        if name == "proxy_peer":
            return decision.upstream
        if name == "proxy_decision":
            return decision
        if name == "socket":
            return default
        if name == "proxy_socket":
            return self._transport.get_extra_info("socket", default)
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        if self._on_set_protocol is not None:
            self._on_set_protocol(protocol)
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self._transport.close()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._transport.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._transport.writelines(list_of_data)

    def write_eof(self) -> None:
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def abort(self) -> None:
        self._transport.abort()

    def __repr__(self) -> str:
        return f"<ProxiedTransport client={self._decision.client} via {self._transport!r}>"


def deliver(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Hand ``data`` to a protocol as if the transport had read it (plain or buffered)."""
    if not data:
        return
    if isinstance(protocol, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buf = memoryview(protocol.get_buffer(len(view)))
            n = min(len(buf), len(view))
            if n == 0:
                raise RuntimeError("BufferedProtocol.get_buffer() returned an empty buffer")
            buf[:n] = view[:n]
            protocol.buffer_updated(n)
            view = view[n:]
    elif isinstance(protocol, asyncio.Protocol):
        protocol.data_received(data)


# Switches an accepted connection over; returns the application's protocol (None while a TLS
# handshake is still to come).
Switch = Callable[[asyncio.Transport, Decision], asyncio.BaseProtocol | None]
ProtocolFactory = Callable[[], asyncio.BaseProtocol]
OnSetProtocol = Callable[[asyncio.BaseProtocol], None]

# Handshakes in progress: the loop keeps only weak references to tasks.
_handshakes: set[asyncio.Task[None]] = set()


def hand_over(
    transport: asyncio.Transport,
    decision: Decision,
    protocol_factory: ProtocolFactory,
    *,
    ssl: ssl_module.SSLContext | None = None,
    ssl_handshake_timeout: float | None = None,
    on_set_protocol: OnSetProtocol | None = None,
    logger: logging.Logger | None = None,
) -> asyncio.BaseProtocol | None:
    """Give an accepted connection to the application's protocol, with the real addresses.

    Without ``ssl``: switch the transport to a new protocol at once, then hand it the bytes that
    followed the header. With ``ssl``: run the TLS handshake on the transport first (the header
    was read without reading past it), then give the protocol the TLS transport. Returns the
    protocol, or None while the handshake is still to come.
    """
    if ssl is None:
        protocol = protocol_factory()
        transport.set_protocol(protocol)
        protocol.connection_made(ProxiedTransport(transport, decision, on_set_protocol))
        deliver(protocol, decision.trailing)
        return protocol
    if decision.trailing:
        raise RuntimeError("TLS after the PROXY header needs a header read without over-reading")
    # Not one more read until the TLS layer owns the transport: the ClientHello is its.
    transport.pause_reading()
    task = asyncio.get_running_loop().create_task(
        _start_tls(
            transport,
            decision,
            protocol_factory,
            ssl,
            ssl_handshake_timeout,
            on_set_protocol,
            logger or log,
        )
    )
    _handshakes.add(task)
    task.add_done_callback(_handshakes.discard)
    return None


class _Pending(asyncio.Protocol):
    """Holds what the TLS layer delivers between the handshake and the app's connection_made."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.eof = False
        self.lost = False
        self.exc: Exception | None = None

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        return True  # the application decides once it is connected

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost, self.exc = True, exc


async def _start_tls(
    transport: asyncio.Transport,
    decision: Decision,
    protocol_factory: ProtocolFactory,
    ssl: ssl_module.SSLContext,
    ssl_handshake_timeout: float | None,
    on_set_protocol: OnSetProtocol | None,
    logger: logging.Logger,
) -> None:
    loop = asyncio.get_running_loop()
    pending = _Pending()
    try:
        tls = await loop.start_tls(
            transport,
            pending,
            ssl,
            server_side=True,
            ssl_handshake_timeout=ssl_handshake_timeout,
        )
    except Exception as err:  # SSLError, resets, the handshake timeout: all end the same way
        logger.warning(
            "TLS handshake with %s via %s failed: %s",
            _fmt(decision.client),
            _fmt(decision.upstream),
            err or type(err).__name__,
        )
        transport.abort()
        return
    if tls is None:  # closed during the handshake
        transport.abort()
        return
    try:
        protocol = protocol_factory()
        tls.set_protocol(protocol)
        protocol.connection_made(ProxiedTransport(tls, decision, on_set_protocol))
        for chunk in pending.chunks:
            deliver(protocol, chunk)
        if (
            pending.eof
            and isinstance(protocol, asyncio.Protocol | asyncio.BufferedProtocol)
            and not protocol.eof_received()
        ):
            tls.close()
        if pending.lost:
            protocol.connection_lost(pending.exc)
    except Exception:
        logger.exception("backend: the application protocol failed to start; closing")
        transport.abort()


def _fmt(address: tuple[str, int] | None) -> str:
    return "-" if address is None else format_hostport(*address)


class _HeaderReading(asyncio.BaseProtocol):
    """Reads one connection's PROXY header through a :class:`HeaderGate`, then hands over.

    On acceptance ``on_accept(transport, decision)`` switches the transport to the real protocol;
    on rejection the connection is closed and logged with the reason and the peer. Silent peers
    are decided (closed, or served as direct clients under ``optional``) at ``header_timeout``.
    """

    def __init__(
        self,
        policy: ProxyPolicy,
        on_accept: Switch,
        on_reject: Callable[[Decision], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.policy = policy
        self.on_accept = on_accept
        self.on_reject = on_reject
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.gate: HeaderGate | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._handed_over = False
        self._app: asyncio.BaseProtocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Duck-typed: uvloop's transports are not subclasses of asyncio.Transport.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.gate = self.policy.start(
            transport.get_extra_info("peername"), transport.get_extra_info("sockname")
        )
        if self.gate.decision is not None:
            self._decided(self.gate.decision)
            return
        loop = self.loop or asyncio.get_running_loop()
        self._timer = loop.call_later(self.policy.header_timeout, self._expire)

    def _received(self, data: bytes) -> None:
        gate = self.gate
        if gate is None or gate.decision is not None:
            return  # rejected and closing: drop what the peer still sends
        decision = gate.feed(data)
        if decision is not None:
            self._decided(decision)

    def eof_received(self) -> bool | None:
        gate = self.gate
        if gate is None or gate.decision is not None:
            return None
        self._decided(gate.eof())
        app = self._app
        if isinstance(app, asyncio.Protocol | asyncio.BufferedProtocol):
            return app.eof_received()  # accepted (optional, nothing sent): the app's answer
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()

    def shutdown(self) -> None:
        """Close a connection still waiting for its header (server shutdown)."""
        if self.transport is not None and not self._handed_over:
            self.transport.close()

    def _expire(self) -> None:
        self._timer = None
        if self.gate is not None and self.gate.decision is None:
            self._decided(self.gate.expire())

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _decided(self, decision: Decision) -> None:
        self._cancel_timer()
        transport = self.transport
        assert transport is not None
        if not decision.accepted:
            if self.on_reject is not None:
                self.on_reject(decision)
            # abort(): nothing of ours is buffered, and a hostile peer gets no lingering socket.
            transport.abort()
            return
        self._handed_over = True
        try:
            self._app = self.on_accept(transport, decision)
        except Exception:
            log.exception("backend: the application protocol failed to start; closing")
            transport.abort()


class HeaderProtocol(_HeaderReading, asyncio.Protocol):
    """Reads the PROXY header from whatever the transport reads; hands over the leftover bytes."""

    def data_received(self, data: bytes) -> None:
        self._received(data)


class ExactHeaderProtocol(_HeaderReading, asyncio.BufferedProtocol):
    """Reads the PROXY header and never past it (TLS follows on the socket).

    It asks the transport for at most ``HeaderGate.next_read_size()`` bytes per read, so the
    first byte after the header (a TLS ClientHello) is still in the socket for the handshake.
    Deliberately not an ``asyncio.Protocol``: uvloop prefers ``data_received`` when both exist.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._buffer = bytearray(0)

    def get_buffer(self, sizehint: int) -> bytearray:
        gate = self.gate
        size = gate.next_read_size() if gate is not None and gate.decision is None else 0
        # After a decision the transport is closing or switched: take what comes and drop it.
        self._buffer = bytearray(size or 256)
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._received(bytes(self._buffer[:nbytes]))


def check_tls_policy(policy: ProxyPolicy) -> None:
    """TLS after the header works with ``required`` and ``off``; ``optional`` cannot.

    Under ``optional`` the first bytes of a direct client must be read to see that they are not
    a PROXY signature, and a TLS handshake cannot be started on bytes already read.
    """
    if policy.mode is Mode.OPTIONAL:
        raise ValueError(
            "TLS after the PROXY header needs accept_proxy 'required' (or 'off'): under "
            "'optional' a direct client's first TLS bytes would be read to look for a header"
        )


class ProxyProtocolFactory:
    """A protocol factory for ``loop.create_server`` that reads the PROXY header first.

    ``ProxyProtocolFactory(MyProtocol, policy)``: each connection starts with a header-reading
    protocol; once the policy accepts, ``MyProtocol()`` is created, switched in with
    ``transport.set_protocol()``, given a :class:`ProxiedTransport` in ``connection_made`` and
    then the bytes that followed the header. ``rejections`` counts refused connections by reason.

    With ``ssl`` (an ``SSLContext``; do not also pass it to ``create_server``), TLS is terminated
    here after the header, as the balancer passed the client's TLS through untouched; the
    protocol gets the TLS transport (``get_extra_info("ssl_object")`` and ``"peercert"`` work).
    """

    def __init__(
        self,
        protocol_factory: ProtocolFactory,
        policy: ProxyPolicy,
        *,
        ssl: ssl_module.SSLContext | None = None,
        ssl_handshake_timeout: float | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        if ssl is not None:
            check_tls_policy(policy)
        self.protocol_factory = protocol_factory
        self.policy = policy
        self.ssl = ssl
        self.ssl_handshake_timeout = ssl_handshake_timeout
        self.logger = logger or log
        self.rejections: Counter[str] = Counter()

    def __call__(self) -> asyncio.BaseProtocol:
        cls = HeaderProtocol if self.ssl is None else ExactHeaderProtocol
        return cls(self.policy, self._switch, self._reject)

    def _reject(self, decision: Decision) -> None:
        self.rejections[decision.reason.value] += 1
        self.logger.warning("PROXY %s", decision.describe())

    def _switch(
        self, transport: asyncio.Transport, decision: Decision
    ) -> asyncio.BaseProtocol | None:
        return hand_over(
            transport,
            decision,
            self.protocol_factory,
            ssl=self.ssl,
            ssl_handshake_timeout=self.ssl_handshake_timeout,
            logger=self.logger,
        )


async def start_server(
    client_connected_cb: ClientConnected,
    host: str | list[str] | None = None,
    port: int | None = None,
    *,
    policy: ProxyPolicy,
    limit: int = 2**16,
    ssl: ssl_module.SSLContext | None = None,
    ssl_handshake_timeout: float | None = None,
    logger: logging.Logger | None = None,
    **kwargs: Any,
) -> asyncio.Server:
    """:func:`asyncio.start_server` behind a PROXY-speaking balancer.

    ``client_connected_cb(reader, writer)`` runs once the policy accepts the connection; the
    bytes that followed the header are the first the reader returns. Other keyword arguments go
    to ``loop.create_server``. The factory is on the server as ``server.proxy_factory`` (for
    its ``rejections`` counter; not under uvloop, whose servers take no attributes).

    ``ssl``: terminate TLS here, after the PROXY header (the balancer passes TLS through, as
    HAProxy ``mode tcp`` with ``send-proxy`` does). Needs ``policy.mode`` ``required`` or ``off``.
    """
    loop = asyncio.get_running_loop()

    def stream_protocol() -> asyncio.StreamReaderProtocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)

    factory = ProxyProtocolFactory(
        stream_protocol,
        policy,
        ssl=ssl,
        ssl_handshake_timeout=ssl_handshake_timeout,
        logger=logger,
    )
    server = await loop.create_server(factory, host, port, **kwargs)
    # uvloop's Server takes no new attributes; there, use ProxyProtocolFactory directly.
    with contextlib.suppress(AttributeError):
        server.proxy_factory = factory  # type: ignore[attr-defined]
    return server
