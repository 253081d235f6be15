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
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, cast

from l4lb.trust.policy import Decision, HeaderGate, ProxyPolicy

__all__ = [
    "ProxiedTransport",
    "ProxyProtocolFactory",
    "deliver",
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


Switch = Callable[[asyncio.Transport, Decision], None]


class HeaderProtocol(asyncio.Protocol):
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

    def data_received(self, data: bytes) -> None:
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
        decision = gate.eof()
        self._decided(decision)
        if decision.accepted and self.transport is not None:
            app = self.transport.get_protocol()
            if isinstance(app, asyncio.Protocol | asyncio.BufferedProtocol) and app is not self:
                return app.eof_received()
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
            self.on_accept(transport, decision)
        except Exception:
            log.exception("backend: the application protocol failed to start; closing")
            transport.abort()


class ProxyProtocolFactory:
    """A protocol factory for ``loop.create_server`` that reads the PROXY header first.

    ``ProxyProtocolFactory(MyProtocol, policy)``: each connection starts with a header-reading
    protocol; once the policy accepts, ``MyProtocol()`` is created, switched in with
    ``transport.set_protocol()``, given a :class:`ProxiedTransport` in ``connection_made`` and
    then the bytes that followed the header. ``rejections`` counts refused connections by reason.
    """

    def __init__(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        policy: ProxyPolicy,
        *,
        logger: logging.Logger | None = None,
    ) -> None:
        self.protocol_factory = protocol_factory
        self.policy = policy
        self.logger = logger or log
        self.rejections: Counter[str] = Counter()

    def __call__(self) -> asyncio.Protocol:
        return HeaderProtocol(self.policy, self._switch, self._reject)

    def _reject(self, decision: Decision) -> None:
        self.rejections[decision.reason.value] += 1
        self.logger.warning("PROXY %s", decision.describe())

    def _switch(self, transport: asyncio.Transport, decision: Decision) -> None:
        protocol = self.protocol_factory()
        transport.set_protocol(protocol)
        protocol.connection_made(ProxiedTransport(transport, decision))
        deliver(protocol, decision.trailing)


async def start_server(
    client_connected_cb: ClientConnected,
    host: str | list[str] | None = None,
    port: int | None = None,
    *,
    policy: ProxyPolicy,
    limit: int = 2**16,
    logger: logging.Logger | None = None,
    **kwargs: Any,
) -> asyncio.Server:
    """:func:`asyncio.start_server` behind a PROXY-speaking balancer.

    ``client_connected_cb(reader, writer)`` runs once the policy accepts the connection; the
    bytes that followed the header are the first the reader returns. Other keyword arguments go
    to ``loop.create_server``. The factory is on the server as ``server.proxy_factory`` (for
    its ``rejections`` counter).
    """
    if kwargs.get("ssl") is not None:
        raise ValueError(
            "start_server(ssl=...): the PROXY header comes before the TLS handshake; "
            "terminate TLS at the balancer"
        )
    loop = asyncio.get_running_loop()

    def stream_protocol() -> asyncio.StreamReaderProtocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)

    factory = ProxyProtocolFactory(stream_protocol, policy, logger=logger)
    server = await loop.create_server(factory, host, port, **kwargs)
    server.proxy_factory = factory  # type: ignore[attr-defined]
    return server
