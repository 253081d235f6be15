"""PROXY protocol for socketserver and http.server: a mixin for ``StreamRequestHandler``.

    class Handler(ProxyProtocolMixin, http.server.SimpleHTTPRequestHandler):
        proxy_policy = ProxyPolicy(mode="required", trusted=["127.0.0.1"])

Before the handler is set up, the header is read and the policy applied; a rejected connection
is logged and closed without the handler ever running. In an accepted one ``client_address`` is
the real client (so ``http.server``'s log lines show it), ``proxy_header`` the
:class:`~l4lb.proxy_protocol.ProxyHeader` (None without one), ``proxy_peer`` the balancer's
address and ``proxy_destination`` the original destination.

The header is read with ``MSG_PEEK`` and then exactly its length is consumed, so not one
application byte is taken from the socket the handler's ``rfile`` reads; ``header_timeout`` is
enforced with socket timeouts. With ``proxy_ssl_context`` set, TLS starts right after the
header (in all three modes: nothing past the header has been read). Use a threading server
(``ThreadingTCPServer``, ``ThreadingHTTPServer``): a single-threaded one waits for each
connection's header in turn.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import time
from typing import Any, ClassVar

from l4lb.trust.policy import Address, Decision, ProxyPolicy

__all__ = ["ProxyProtocolMixin", "read_header"]

log = logging.getLogger("l4lb.backend")

# Polling for more bytes when a peek shows nothing new: a header split across segments waits at
# most this long between looks (MSG_PEEK | MSG_WAITALL does not wait on Linux once data is there).
_POLL_MIN = 0.001
_POLL_MAX = 0.02


def read_header(sock: socket.socket, policy: ProxyPolicy, peer: Any) -> Decision:
    """Decide one blocking socket's PROXY header: peek, decide, consume exactly the header.

    Blocks at most ``policy.header_timeout``; the socket's own timeout is restored afterwards.
    The bytes after the header stay in the socket for the application to read.
    """
    gate = policy.start(peer, sock.getsockname())
    if gate.decision is not None:
        return gate.decision
    previous = sock.gettimeout()
    deadline = time.monotonic() + policy.header_timeout
    pause = _POLL_MIN
    decision: Decision | None = None
    try:
        while decision is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                decision = gate.expire()
                break
            sock.settimeout(remaining)
            try:
                data = sock.recv(gate.received + gate.next_read_size(), socket.MSG_PEEK)
            except (TimeoutError, BlockingIOError):
                decision = gate.expire()
                break
            except OSError as err:
                decision = gate.eof()
                log.debug("PROXY header read from %s failed: %s", peer, err)
                break
            if len(data) <= gate.received:
                if len(data) < gate.received or not data:
                    decision = gate.eof()  # the peer closed (nothing new will come)
                    break
                if _peer_closed(sock, min(pause, max(0.0, deadline - time.monotonic()))):
                    decision = gate.eof()
                    break
                pause = min(pause * 2, _POLL_MAX)
                continue
            pause = _POLL_MIN
            decision = gate.feed(data[gate.received :])
        if decision.accepted and decision.consumed:
            _consume(sock, decision.consumed)
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(previous)
    return decision


def _peer_closed(sock: socket.socket, wait: float) -> bool:
    """Wait up to ``wait`` seconds; True if the peer has shut down its side meanwhile."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    events = poller.poll(wait * 1000)
    return any(mask & (select.POLLRDHUP | select.POLLHUP) for _, mask in events)


def _consume(sock: socket.socket, count: int) -> None:
    """Drop the header's ``count`` bytes, which a peek has already seen in the socket."""
    while count > 0:
        chunk = sock.recv(count)
        if not chunk:
            raise ConnectionError("connection closed while dropping the PROXY header")
        count -= len(chunk)


def _tls_handshake(
    sock: socket.socket,
    context: ssl.SSLContext,
    timeout: float,
    decision: Decision,
    logger: logging.Logger,
) -> ssl.SSLSocket | None:
    """TLS on a socket whose PROXY header has been consumed; None (logged) if it fails."""
    previous = sock.gettimeout()
    try:
        sock.settimeout(timeout)
        tls = context.wrap_socket(sock, server_side=True)
        tls.settimeout(previous)
        return tls
    except OSError as err:  # SSLError, timeouts and resets are all OSErrors
        logger.warning(
            "TLS handshake with %s via %s failed: %s",
            decision.client,
            decision.upstream,
            err or type(err).__name__,
        )
        return None


class ProxyProtocolMixin:
    """Put before ``StreamRequestHandler`` (or ``BaseHTTPRequestHandler``) in the bases.

    Set ``proxy_policy`` on the handler class. The header is decided in ``__init__`` before
    ``setup()``, so handlers that override ``handle()`` need nothing else.
    """

    proxy_policy: ClassVar[ProxyPolicy]
    proxy_logger: ClassVar[logging.Logger] = log
    proxy_ssl_context: ClassVar[ssl.SSLContext | None] = None
    """Set to terminate TLS here, after the header (the balancer passes TLS through)."""

    proxy_header: Any
    proxy_peer: Address
    proxy_destination: Address | None
    proxy_decision: Decision

    def __init__(self, request: Any, client_address: Any, server: Any) -> None:
        policy = getattr(self, "proxy_policy", None)
        if not isinstance(policy, ProxyPolicy):
            raise TypeError(f"{type(self).__name__}.proxy_policy must be a ProxyPolicy")
        try:
            decision = read_header(request, policy, client_address)
        except OSError as err:
            self.proxy_logger.warning("PROXY header from %s: %s; closing", client_address, err)
            return
        self.proxy_decision = decision
        if not decision.accepted:
            self.proxy_logger.warning("PROXY %s", decision.describe())
            counter = getattr(server, "proxy_rejections", None)
            if isinstance(counter, dict):
                counter[decision.reason.value] = counter.get(decision.reason.value, 0) + 1
            return  # the server's shutdown_request() closes the socket
        self.proxy_header = decision.header
        self.proxy_peer = decision.upstream
        self.proxy_destination = decision.destination
        context = self.proxy_ssl_context
        if context is None:
            super().__init__(request, decision.client, server)  # type: ignore[call-arg]
            return
        tls = _tls_handshake(request, context, policy.header_timeout, decision, self.proxy_logger)
        if tls is None:
            return
        try:
            super().__init__(tls, decision.client, server)  # type: ignore[call-arg]
        finally:
            tls.close()
