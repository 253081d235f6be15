"""What every relay implements and what it reports: the contract between a connection and its relay.

A relay moves bytes between an accepted client socket and a connected backend socket::

    start(loop, client_sock, backend_sock, first, conn) -> Relay

``first`` (the PROXY header, plus any client bytes already read) goes to the backend in one write
before anything else. ``conn`` is a :class:`RelayConn`: the relay adds to its byte counters and
calls ``conn.relay_closed(reason)`` exactly once, when both sockets are closed.
``Relay.close(reason)`` ends it early (idle timeout, shutdown). Every relay keeps the same rules:
byte-exact both ways; half-close (a FIN one way becomes ``shutdown(SHUT_WR)`` the other way while
the opposite direction keeps flowing); a reset on one side resets the other at once
(:func:`reset_socket`); backpressure with bounded memory. Idle timeouts are not the relay's: the
runtime's sweep watches the byte counters and calls ``close(EndReason.IDLE_TIMEOUT)``.

Three implementations: :mod:`l4lb.balancer.relay` (``stream``, asyncio Protocols),
:mod:`l4lb.balancer.splice` (``splice``, zero-copy) and :mod:`l4lb.balancer.kernel_relay`
(``kernel``, an eBPF sockmap, opt-in); :func:`get_relay` picks one by name.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import logging
import socket
import struct
from collections.abc import Callable
from enum import StrEnum
from typing import Protocol

__all__ = [
    "LINGER_RST",
    "RESET_ERRNOS",
    "EndReason",
    "NativeConn",
    "Relay",
    "RelayConn",
    "Socket",
    "StartRelay",
    "default_relay",
    "error_reason",
    "get_relay",
    "python_socket",
    "reset_socket",
    "socket_class",
]

log = logging.getLogger("l4lb.relay")

Socket = _socket.socket
"""What a relay is given: ``socket.socket`` is a Python subclass of this C type, whose
``__init__`` and ``close`` are Python frames; the listener makes the C type itself for the
relays that can take it (:func:`socket_class`)."""


class EndReason(StrEnum):
    """Why a connection ended: the access log's ``end`` (the values are the log's words)."""

    CLIENT_CLOSED = "client_closed"
    """The client sent FIN first, then both directions finished."""
    BACKEND_CLOSED = "backend_closed"
    """The backend sent FIN first, then both directions finished."""
    CLOSED = "closed"
    """Closed with no FIN seen first (a side closed while the relay was being set up)."""
    RESET = "reset"
    """A reset, broken pipe or TCP timeout on either socket: both were reset."""
    ERROR = "error"
    """Another socket error (the access log's ``detail`` says which when known)."""
    IDLE_TIMEOUT = "idle_timeout"
    """No byte moved either way for the pool's ``idle_timeout``."""
    CLIENT_TIMEOUT = "client_timeout"
    """The client sent nothing for the pool's ``client_timeout``."""
    SERVER_TIMEOUT = "server_timeout"
    """The backend sent nothing for the pool's ``server_timeout``."""
    NO_ROUTE = "no_route"
    """No route matched and the listener says ``default = "reject"`` (the client is reset)."""
    SHUTDOWN = "shutdown"
    """Still open when the drain timeout of a stop ran out."""
    NO_BACKEND = "no_backend"
    """No backend of the pool was available (the client is reset)."""
    CONNECT_FAILED = "connect_failed"
    """Every backend tried refused, timed out or failed (the client is reset)."""
    HEADER_ERROR = "header_error"
    """The PROXY header for the backend could not be built (the client is reset)."""
    SOURCE_FAILED = "source_failed"
    """A backend connection could not come from its ``source``: the bind of the
    client's or the fixed address was refused, or a transparent connect got no reply back (the
    return route); the detail says which (the client is reset)."""


LINGER_RST = struct.pack("ii", 1, 0)
"""SO_LINGER on, 0 seconds: close() sends a RST instead of a FIN."""

RESET_ERRNOS = frozenset((errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT))
"""Socket errors that mean the peer reset (or the connection died): reason ``reset``."""


def error_reason(code: int | None) -> EndReason:
    """The end reason for a socket error number."""
    return EndReason.RESET if code in RESET_ERRNOS else EndReason.ERROR


def reset_socket(sock: Socket) -> None:
    """Arrange for the next close of ``sock`` to send a RST."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)


class RelayConn(Protocol):
    """What a relay needs from the connection it serves."""

    bytes_from_client: int
    bytes_to_client: int

    def relay_closed(self, reason: EndReason) -> None:
        """Both sides are closed; ``reason`` is the first thing that ended the connection."""


class NativeConn:
    """A :class:`RelayConn` a compiled relay reaches without Python-level look-ups: its
    counters are C fields and ``relay_closed`` a C call (through the protocol, each ``+=`` on a
    counter is a generic attribute get and set, about 300 instructions). The balancer's
    ``Connection`` is one; a relay takes any other ``RelayConn`` through the protocol."""

    __slots__ = ("bytes_from_client", "bytes_to_client")

    def __init__(self) -> None:
        self.bytes_from_client = 0
        self.bytes_to_client = 0

    def relay_closed(self, reason: EndReason) -> None:
        raise NotImplementedError


class Relay(Protocol):
    """A running relay, as its connection sees it."""

    def close(self, reason: EndReason) -> None:
        """Close both sides now (idle timeout, shutdown), discarding buffered data."""


StartRelay = Callable[[asyncio.AbstractEventLoop, Socket, Socket, bytes, RelayConn], Relay]
"""``start(loop, client_sock, backend_sock, first, conn)``: relay two connected sockets."""


def socket_class(start: StartRelay) -> type[Socket]:
    """The class of the sockets made for ``start``: the C type (no Python ``__init__``,
    ``close`` and ``_real_close`` frames: about 10k fewer user-space instructions per spliced
    connection), but ``socket.socket`` for the stream relay (see :func:`python_socket`)."""
    from l4lb.balancer import relay

    return socket.socket if start is relay.start_relay else Socket


def python_socket(sock: Socket) -> socket.socket:
    """``sock`` as a ``socket.socket``, which uvloop's transports need: they detach one when
    they close, but close any other object a second time after libuv has (``EBADF``, or a
    descriptor another thread has just been given). A C socket, made for another relay before a
    reload switched to the stream relay, is wrapped anew (one ``getsockname`` more)."""
    if isinstance(sock, socket.socket):
        return sock
    return socket.socket(sock.family, sock.type, sock.proto, sock.detach())


def default_relay() -> StartRelay:
    """``splice`` where ``os.splice`` exists, else ``stream``."""
    from l4lb.balancer import relay, splice

    return splice.start_splice_relay if splice.available() else relay.start_relay


def get_relay(name: str, handover: tuple[int, float] = (3, 1.0)) -> StartRelay:
    """The relay for the config's ``relay`` key (``stream``, ``splice`` or ``kernel``).

    ``handover``: for ``kernel``, when a connection leaves splice for the kernel (the ``[kernel]``
    table's exchanges and seconds; either 0: at once)."""
    from l4lb.balancer import relay, splice

    if name == "kernel":
        # loads and self-tests the program here, in the worker; one log line when it cannot
        from l4lb.balancer import kernel_relay

        policy = kernel_relay.Handover(*handover)
        start = kernel_relay.prepare(default=default_relay(), handover=policy)
        return start if start is not None else default_relay()
    if name == "splice":
        if splice.available():
            return splice.start_splice_relay
        log.warning("event=relay_fallback wanted=splice using=stream detail='no os.splice'")
    return relay.start_relay
