"""Routes: the pool of a connection chosen by its TLS ClientHello (SNI and ALPN), not decrypted.

A listener's ``routes`` are tried in order, the first match wins (HAProxy's ``use_backend ... if
{ req.ssl_sni ... }`` lines, nginx's ``map $ssl_preread_server_name``). A route's ``sni`` is an
exact name or ``*.domain``, which matches any name ending in ``.domain`` (nginx's wildcard
``server_name``: ``www.example.com`` and ``a.b.example.com``, not ``example.com``); names compare
case-insensitively (a trailing dot is ignored). A route's ``alpn`` matches when the client
offers that protocol among its offers. A ClientHello without SNI only matches routes without
``sni``; anything that is not TLS matches no route.

:func:`unreachable` finds routes that can never match because an earlier one takes all their
traffic (``l4lb check`` reports them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from l4lb.config.schema import ListenerConfig, RouteConfig


@dataclass(frozen=True, slots=True)
class Route:
    """One compiled route."""

    label: str
    """Its name in the access log (``route``) and the metrics."""
    pool: str
    exact: str | None
    """A lowercased exact server name, or None."""
    suffix: str | None
    """For ``*.example.com``: ``.example.com`` (lowercased), or None."""
    alpn: bytes | None

    @classmethod
    def compile(cls, config: RouteConfig) -> Route:
        exact = suffix = None
        if config.sni is not None:
            name = config.sni.lower().rstrip(".")
            if name.startswith("*."):
                suffix = name[1:]
            else:
                exact = name
        alpn = config.alpn.encode() if config.alpn is not None else None
        return cls(config.label, config.pool, exact, suffix, alpn)

    def matches(self, server_name: str | None, alpn: Sequence[bytes]) -> bool:
        """``server_name`` already lowercased without a trailing dot."""
        if self.exact is not None and server_name != self.exact:
            return False
        if self.suffix is not None and (
            server_name is None or not server_name.endswith(self.suffix)
        ):
            return False
        return self.alpn is None or self.alpn in alpn

    def covers(self, other: Route) -> bool:
        """True when every connection ``other`` matches is matched by this route too."""
        if self.alpn is not None and self.alpn != other.alpn:
            return False
        if self.exact is None and self.suffix is None:
            return True
        if other.exact is None and other.suffix is None:
            return False
        if self.exact is not None:
            return other.exact == self.exact
        assert self.suffix is not None
        name = other.exact if other.exact is not None else other.suffix
        assert name is not None
        return name.endswith(self.suffix)


class RouteTable:
    """A listener's routes, compiled once per config."""

    __slots__ = ("peek_timeout", "reject", "routes")

    def __init__(
        self, routes: Sequence[RouteConfig], reject: bool = False, peek_timeout: float = 1.0
    ) -> None:
        self.routes = tuple(Route.compile(r) for r in routes)
        self.reject = reject
        """True: a connection no route matches is refused (``default = "reject"``)."""
        self.peek_timeout = peek_timeout
        """Seconds to wait for the ClientHello (the listener's ``tls_peek_timeout``)."""

    @classmethod
    def of(cls, config: ListenerConfig) -> RouteTable | None:
        """A listener's routes, or None when it has none (its pool takes everything)."""
        if not config.routes:
            return None
        return cls(config.routes, config.default == "reject", config.tls_peek_timeout_s)

    def match(self, server_name: str | None, alpn: Sequence[bytes]) -> Route | None:
        """The first route matching the ClientHello's values, or None."""
        if server_name is not None:
            server_name = server_name.lower().rstrip(".")
        for route in self.routes:
            if route.matches(server_name, alpn):
                return route
        return None


def unreachable(routes: Sequence[RouteConfig]) -> list[tuple[int, int]]:
    """``(index, earlier index)`` for each route an earlier route shadows entirely."""
    compiled = [Route.compile(r) for r in routes]
    found = []
    for j, later in enumerate(compiled):
        for i in range(j):
            if compiled[i].covers(later):
                found.append((j, i))
                break
    return found
