"""PROXY protocol for uvicorn: a protocol class to pass as ``uvicorn.Config(app, http=...)``.

    config = uvicorn.Config(app, http=proxy_protocol_http(trusted=["127.0.0.1"]),
                            proxy_headers=False)

or, by name, configured from the environment (:mod:`l4lb.backend.environ`), for the command line,
``--workers N`` and ``--reload``:

    L4LB_TRUSTED_PROXIES=10.0.0.0/8 uvicorn myapp:app --workers 4 --no-proxy-headers \\
        --http l4lb.backend.uvicorn:ProxyProtocolHTTP

The classes :func:`proxy_protocol_http` makes pickle by their settings, so
``uvicorn.run("myapp:app", workers=N, http=proxy_protocol_http(...))`` works too: each worker
process rebuilds the class from the same policy. ``L4LB_HTTP`` picks uvicorn's HTTP implementation
under the environment's class (``auto``, ``h11``, ``httptools``).

Each connection starts with a small protocol that reads the PROXY header through the policy's
:class:`~l4lb.trust.policy.HeaderGate`, then switches the transport to uvicorn's own HTTP protocol
(``http="auto" | "h11" | "httptools"`` or a class) with a transport that reports the real
addresses. uvicorn reads ``client`` and ``server`` from that transport in ``connection_made``, so
every request on a keep-alive connection, and a WebSocket after an upgrade (uvicorn hands the same
transport to its WebSocket protocol), sees the real client and the original destination.
``scope["extensions"]["proxy_protocol"]`` carries the header's version and TLVs.

uvicorn's own ``proxy_headers`` (X-Forwarded-For) must be off behind this: the PROXY header
already names the client, and a forwarded header from the client would override it. uvicorn's
own TLS settings must be off too (the header comes before the handshake): terminate TLS at the
balancer, or pass ``ssl=`` here to terminate it after the header.
"""

from __future__ import annotations

import asyncio
import copyreg
import os
import pickle
import ssl as ssl_module
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, ClassVar, cast

from l4lb.backend.asyncio import (
    ExactHeaderProtocol,
    HeaderProtocol,
    check_tls_policy,
    hand_over,
    log,
)
from l4lb.backend.environ import policy_from_env
from l4lb.proxy_protocol import ParseOptions, ProxyHeader
from l4lb.trust.policy import Decision, Mode, PolicyError, ProxyPolicy

__all__ = [
    "BufferedProxyProtocolHTTP",
    "proxy_extension",
    "proxy_protocol_http",
]
# ProxyProtocolHTTP is made on first use from the environment (see __getattr__ below), so it is
# not in __all__: a star import must not read the environment.

HTTP_ENV = "L4LB_HTTP"

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]


def proxy_extension(decision: Decision) -> dict[str, Any]:
    """``scope["extensions"]["proxy_protocol"]``: what the PROXY header said, as plain values.

    ``version`` is None for a connection without a header (``optional``/``off``). ``tlvs`` lists
    every TLV as ``(type, value)`` in wire order; the common ones are decoded beside it.
    """
    header = decision.header
    info: dict[str, Any] = {
        "version": None,
        "reason": decision.reason.value,
        "client": decision.client,
        "destination": decision.destination,
        "upstream": decision.upstream,
        "header": header,
        "command": None,
        "tlvs": [],
        "authority": None,
        "unique_id": None,
        "alpn": None,
        "ssl": None,
    }
    if header is not None:
        info.update(
            version=header.version,
            command=header.command.name,
            tlvs=[(tlv.type, tlv.value) for tlv in header.tlvs],
            authority=header.authority,
            unique_id=header.unique_id,
            alpn=header.alpn,
            ssl=_ssl(header),
        )
    return info


def _ssl(header: ProxyHeader) -> dict[str, Any] | None:
    ssl = header.ssl
    if ssl is None:
        return None
    return {
        "ssl": ssl.ssl,
        "cert_conn": ssl.cert_conn,
        "cert_sess": ssl.cert_sess,
        "verified": ssl.verified,
        "version": ssl.version,
        "cn": ssl.cn,
        "cipher": ssl.cipher,
        "sig_alg": ssl.sig_alg,
        "key_alg": ssl.key_alg,
    }


def _with_extension(app: ASGIApp, extension: dict[str, Any]) -> ASGIApp:
    async def proxied_app(scope: Scope, receive: Any, send: Any) -> None:
        if scope.get("type") in ("http", "websocket"):
            extensions = scope.get("extensions")
            if extensions is None:
                extensions = scope["extensions"] = {}
            extensions["proxy_protocol"] = extension
        await app(scope, receive, send)

    proxied_app._l4lb_proxy_extension = extension  # type: ignore[attr-defined]
    return proxied_app


def _add_extension(protocol: object, extension: dict[str, Any]) -> None:
    """uvicorn's HTTP and WebSocket protocols call ``self.app``; wrap it for this connection."""
    app = getattr(protocol, "app", None)
    if callable(app) and getattr(app, "_l4lb_proxy_extension", None) is None:
        protocol.app = _with_extension(app, extension)  # type: ignore[attr-defined]


def _resolve_http(http: str | type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    if not isinstance(http, str):
        return http
    from uvicorn.config import HTTP_PROTOCOLS
    from uvicorn.importer import import_from_string

    cls: type[asyncio.Protocol] = import_from_string(HTTP_PROTOCOLS.get(http, http))
    return cls


class _ProxyHTTPType(type):
    """The type of the protocol classes: they pickle by their settings (see ``_reduce_class``)."""


class _ProxyHTTP(asyncio.BaseProtocol, metaclass=_ProxyHTTPType):
    """Reads the PROXY header, then becomes uvicorn's HTTP protocol for this connection.

    Not used directly: :func:`proxy_protocol_http` makes a subclass with the policy set.
    """

    policy: ClassVar[ProxyPolicy]
    http_protocol_class: ClassVar[type[asyncio.Protocol]]
    ssl: ClassVar[ssl_module.SSLContext | None] = None
    ssl_handshake_timeout: ClassVar[float | None] = None
    warned: ClassVar[bool] = False

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.config = config
        self.server_state = server_state
        self.app_state = app_state
        self.loop = _loop
        self.connections: set[Any] = server_state.connections
        header_class = HeaderProtocol if self.ssl is None else ExactHeaderProtocol
        self.header: HeaderProtocol | ExactHeaderProtocol = header_class(
            self.policy, self._switch, self._reject, _loop
        )
        cls = type(self)
        if not cls.warned:
            cls.warned = True
            if getattr(config, "proxy_headers", False):
                log.warning(
                    "uvicorn proxy_headers is on: X-Forwarded-For may override the client "
                    "address of the PROXY header; pass proxy_headers=False"
                )
            if getattr(config, "is_ssl", False):
                log.warning(
                    "uvicorn's own TLS is on, but the PROXY header comes before the TLS "
                    "handshake: give the SSLContext to proxy_protocol_http(ssl=...) instead"
                )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Counted as a connection (uvicorn's shutdown closes the ones still in their header).
        self.connections.add(self)
        self.header.connection_made(transport)

    def eof_received(self) -> bool | None:
        return self.header.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.header.connection_lost(exc)

    def shutdown(self) -> None:
        self.header.shutdown()

    def _reject(self, decision: Decision) -> None:
        self.connections.discard(self)
        log.warning("PROXY %s", decision.describe())

    def _switch(
        self, transport: asyncio.Transport, decision: Decision
    ) -> asyncio.BaseProtocol | None:
        self.connections.discard(self)
        extension = proxy_extension(decision)

        def make_protocol() -> asyncio.Protocol:
            protocol = self.http_protocol_class(  # type: ignore[call-arg]
                config=self.config,
                server_state=self.server_state,
                app_state=self.app_state,
                _loop=self.loop,
            )
            _add_extension(protocol, extension)
            return protocol

        return hand_over(
            transport,
            decision,
            make_protocol,
            ssl=self.ssl,
            ssl_handshake_timeout=self.ssl_handshake_timeout,
            on_set_protocol=lambda new: _add_extension(new, extension),
        )


class _PlainProxyHTTP(_ProxyHTTP, asyncio.Protocol):
    """The header-reading protocol when TLS, if any, was terminated before us."""

    def data_received(self, data: bytes) -> None:
        cast(HeaderProtocol, self.header).data_received(data)


class BufferedProxyProtocolHTTP(_ProxyHTTP, asyncio.BufferedProtocol):
    """Reads never past the header, for TLS terminated here (not an ``asyncio.Protocol``:
    uvloop would prefer ``data_received``)."""

    def get_buffer(self, sizehint: int) -> bytearray:
        return cast(ExactHeaderProtocol, self.header).get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        cast(ExactHeaderProtocol, self.header).buffer_updated(nbytes)


def proxy_protocol_http(
    mode: Mode | str = Mode.REQUIRED,
    trusted: Iterable[str] = (),
    header_timeout: float = 5.0,
    http: str | type[asyncio.Protocol] = "auto",
    *,
    options: ParseOptions | None = None,
    policy: ProxyPolicy | None = None,
    ssl: ssl_module.SSLContext | None = None,
    ssl_handshake_timeout: float | None = None,
) -> type[asyncio.BaseProtocol]:
    """A uvicorn HTTP protocol class that reads a PROXY header first (see the module docstring).

    Pass either ``mode``/``trusted``/``header_timeout`` or a ready ``policy``. Bad CIDRs or modes
    raise :class:`~l4lb.trust.policy.PolicyError` here, before the server starts.

    ``ssl``: terminate TLS here, after the header, when the balancer passes the client's TLS
    through (HAProxy ``mode tcp`` + ``send-proxy``); do not also give uvicorn ``ssl_*``
    settings. ``scope["scheme"]`` is then ``https``. Needs mode ``required`` or ``off``.
    """
    if policy is None:
        policy = ProxyPolicy(
            mode=mode,
            trusted=tuple(trusted),
            header_timeout=header_timeout,
            options=options or ParseOptions(),
        )
    if ssl is not None:
        check_tls_policy(policy)
    inner = _resolve_http(http)
    parent: type[_ProxyHTTP] = _PlainProxyHTTP if ssl is None else BufferedProxyProtocolHTTP
    cls = _ProxyHTTPType(
        f"ProxyProtocolHTTP[{inner.__name__}]",
        (parent,),
        {
            "policy": policy,
            "http_protocol_class": inner,
            "ssl": ssl,
            "ssl_handshake_timeout": ssl_handshake_timeout,
            "warned": False,
        },
    )
    return cast("type[_ProxyHTTP]", cls)


_NAMED = frozenset({"_ProxyHTTP", "_PlainProxyHTTP", "BufferedProxyProtocolHTTP"})


def _rebuild(policy: ProxyPolicy, http: type[asyncio.Protocol], name: str) -> type:
    """The class :func:`proxy_protocol_http` made, again, in another process (unpickling)."""
    cls = proxy_protocol_http(policy=policy, http=http)
    cls.__name__ = cls.__qualname__ = name
    return cls


def _reduce_class(cls: _ProxyHTTPType) -> str | tuple[Any, ...]:
    """Pickle a class of ours: the named bases by name, the made ones by their settings.

    uvicorn sends its ``Config`` (``http`` included) to each ``--workers``/``--reload`` process
    with pickle; a class made at run time has no importable name, so it travels as the policy
    and the inner protocol class, and the worker rebuilds it.
    """
    if cls.__name__ in _NAMED and cls.__module__ == __name__:
        return cls.__qualname__
    made = cast("type[_ProxyHTTP]", cls)
    if made.ssl is not None:
        raise pickle.PicklingError(
            "proxy_protocol_http(ssl=...) cannot be sent to worker processes (an SSLContext "
            "does not pickle): run one process per port, or terminate TLS at the balancer"
        )
    return (_rebuild, (made.policy, made.http_protocol_class, cls.__name__))


copyreg.pickle(_ProxyHTTPType, _reduce_class)


def _from_environment() -> type[asyncio.BaseProtocol]:
    try:
        policy = policy_from_env()
    except PolicyError as err:
        # Named on a command line (uvicorn --http ...): a clear line and exit, no traceback.
        raise SystemExit(f"l4lb.backend.uvicorn:ProxyProtocolHTTP: {err}") from None
    http = os.environ.get(HTTP_ENV, "auto").strip() or "auto"
    try:
        cls = proxy_protocol_http(policy=policy, http=http)
    except Exception as err:  # uvicorn's import_from_string on an unknown name
        raise SystemExit(
            f"l4lb.backend.uvicorn:ProxyProtocolHTTP: {HTTP_ENV}={http!r}: {err}"
        ) from None
    cls.__name__ = cls.__qualname__ = "ProxyProtocolHTTP"
    return cls


def __getattr__(name: str) -> Any:
    """``ProxyProtocolHTTP``: the protocol class configured from the environment, made once."""
    if name == "ProxyProtocolHTTP":
        cls = _from_environment()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
