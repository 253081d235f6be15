"""Opening a listener's socket, and the error when it cannot be bound.

Apart from :mod:`l4lb.balancer.listener` (the accept loop), which is compiled with mypyc: a
compiled module cannot define a subclass of ``OSError`` such as :class:`BindError`.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

from l4lb.config.values import format_hostport

__all__ = ["BindError", "OpenSocket", "ensure_not_listening", "open_listening_socket"]


class BindError(OSError):
    """A listener could not bind its address (in use, not local, no permission)."""


OpenSocket = Callable[[str, int], socket.socket]
"""Makes a listener's socket for ``(host, port)``; raises :class:`BindError` when it cannot."""


def open_listening_socket(host: str, port: int, backlog: int = 4096) -> socket.socket:
    """A non-blocking listening socket with SO_REUSEADDR and SO_REUSEPORT (and TCP_NODELAY,
    which accepted sockets inherit)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:  # "[::]:443" takes IPv4 too, whatever bindv6only says
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as err:
        sock.close()
        raise BindError(
            err.errno, f"cannot bind {format_hostport(host, port)}: {err.strerror}"
        ) from err
    return sock


def ensure_not_listening(host: str, port: int) -> None:
    """Raise :class:`BindError` if another socket already listens on ``host:port``.

    Listening sockets set ``SO_REUSEPORT`` (for workers and reloads), so a second ``l4lb run``
    on the same config would bind too and silently take half the connections. A probe bound
    without ``SO_REUSEPORT`` fails where any socket listens, and is closed at once.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # as the listener itself will bind
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            probe.bind((host, port))
        except OSError as err:
            why = err.strerror
            if err.errno == errno.EADDRINUSE:
                why = "address already in use (is another l4lb running with this config?)"
            raise BindError(err.errno, f"cannot bind {format_hostport(host, port)}: {why}") from err
