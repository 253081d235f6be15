"""The configuration file's schema: frozen msgspec Structs, one per TOML table.

Unknown keys are errors (``forbid_unknown_fields``). Values keep the text the operator wrote
(``"3s"``, ``"10.0.0.0/8"``); each Struct offers compiled forms as properties (``*_s`` seconds,
``*_addr`` tuples, ``*_nets`` networks). String values with their own small language are
``Annotated`` with a ``check`` that :mod:`l4lb.config.loader` runs, so every error is reported with
its key path. Cross-table rules (a listener's pool exists, unique names) live in the loader.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Callable
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from l4lb.config import values
from l4lb.config.anycast import AnycastConfig

CHECKS: dict[str, Callable[[Any], object]] = {
    "duration": values.parse_duration,
    "positive_duration": values.parse_positive_duration,
    "timeout": values.parse_timeout,
    "check_interval": values.parse_check_interval,
    "http_path": values.parse_http_path,
    "token": values.parse_token,
    "access": values.parse_access_target,
    "events": values.parse_events_target,
    "hostport": values.parse_hostport,
    "backend_address": values.parse_backend_address,
    "nameserver": values.parse_nameserver,
    "resolve_interval": values.parse_resolve_interval,
    "cidr": values.parse_cidr,
    "rate": values.parse_rate,
    "tlv": values.tlv_type,
    "source": lambda text: source_value(text),
    "status_ranges": values.parse_status_ranges,
}
"""Extra checks named in a type's ``Meta(extra={"check": ...})``: raise ``ValueError`` if bad."""

Duration = Annotated[
    str, Meta(description="a duration such as '250ms', '1.5s', '10m'", extra={"check": "duration"})
]
PositiveDuration = Annotated[
    str,
    Meta(
        description="a duration greater than zero such as '250ms', '1.5s', '10m'",
        extra={"check": "positive_duration"},
    ),
]
Timeout = Annotated[
    str,
    Meta(
        description="a timeout of at least '10ms' such as '500ms', '3s', '10m'",
        extra={"check": "timeout"},
    ),
]
CheckInterval = Annotated[
    str,
    Meta(
        description="a health check interval of at least '100ms' such as '2s'",
        extra={"check": "check_interval"},
    ),
]
HttpPath = Annotated[
    str,
    Meta(
        description="a path starting with '/', visible ASCII only",
        extra={"check": "http_path"},
    ),
]
Token = Annotated[
    str, Meta(description="one or more visible ASCII characters", extra={"check": "token"})
]
HostName = Annotated[
    str,
    Meta(
        pattern=r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
        r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$",
        description="a DNS name such as 'lb1.example.net' (no port, no scheme)",
    ),
]
MAX_WORKERS = 256
"""The most worker processes: as many as the largest common machines have CPUs (256 vCPUs);
more only adds context switches, and a typo (99999999999999999999) would fork until memory runs
out. A fixed bound, not one computed from this machine's CPUs, so that ``l4lb check`` gives the
same answer on the machine that checks a file and on the one that runs it."""
Workers = Annotated[int, Meta(ge=1, le=MAX_WORKERS)]
AccessTarget = Annotated[
    str,
    Meta(
        description="'stdout', 'off', a file path or 'syslog:/dev/log'",
        extra={"check": "access"},
    ),
]
EventsTarget = Annotated[
    str,
    Meta(description="'stderr' or 'syslog:/dev/log'", extra={"check": "events"}),
]
Facility = Literal[
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
    "authpriv", "ftp", "ntp", "audit", "alert", "clock",
    "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7",
]  # fmt: skip
SyslogTag = Annotated[
    str,
    Meta(
        pattern=r"^[\x21-\x7e]{1,48}$",
        description="1 to 48 visible ASCII characters, such as 'l4lb'",
    ),
]
HostPort = Annotated[
    str, Meta(description="IP:PORT, IPv6 as '[::1]:8443'", extra={"check": "hostport"})
]
BackendAddressText = Annotated[
    str,
    Meta(
        description="IP:PORT, NAME:PORT (A/AAAA records) or 'srv+_SERVICE._PROTO.NAME' (SRV)",
        extra={"check": "backend_address"},
    ),
]
NameServer = Annotated[
    str, Meta(description="IP or IP:PORT, IPv6 as '[::1]:53'", extra={"check": "nameserver"})
]
ResolveInterval = Annotated[
    str,
    Meta(
        description="a duration of at least '100ms' such as '1s', '5m'",
        extra={"check": "resolve_interval"},
    ),
]
Cidr = Annotated[str, Meta(description="a CIDR such as '10.0.0.0/8'", extra={"check": "cidr"})]
Rate = Annotated[str, Meta(description="a rate such as '50/s' or '100/m'", extra={"check": "rate"})]
TlvName = Annotated[
    str | int,
    Meta(description="a TLV name (unique_id, authority, ...) or number", extra={"check": "tlv"}),
]
Name = Annotated[
    str,
    Meta(
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="1-64 characters among letters, digits, '_', '.', '-'",
    ),
]
PositiveInt = Annotated[int, Meta(ge=1)]
MAX_COUNT = 1_000_000
"""The most connections (or pending headers, or burst tokens) one key may count: the kernel's
default ceiling on one process's descriptors is fs.nr_open = 1048576, so a larger limit can never
be reached, and a typo of twenty digits would only overflow the descriptor arithmetic."""
Count = Annotated[int, Meta(ge=1, le=MAX_COUNT)]


def source_value(text: str) -> str:
    """A ``source`` value: ``"balancer"``, ``"client"`` or an IP literal (normalized).

    Raises ValueError for anything else.
    """
    if text in ("balancer", "client"):
        return text
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(
            f"invalid source {text!r}: expected 'balancer', 'client' (transparent: the client's "
            "own address) or an IP address of this host such as '198.51.100.5'"
        ) from None


Source = Annotated[
    str,
    Meta(
        description="'balancer', 'client' or an IP address such as '198.51.100.5'",
        extra={"check": "source"},
    ),
]
ProxyVersion = Literal["off", "v1", "v2"]
Balance = Literal["roundrobin", "leastconn", "random2", "maglev"]
ProxyTlv = Literal["unique_id", "authority", "alpn", "crc32c", "noop"]
AcceptProxy = Literal["off", "optional", "required"]
CheckKind = Literal["tcp", "proxy-local", "http", "send-expect", "tls"]
HttpMethod = Literal["GET", "HEAD", "OPTIONS", "POST"]
NoRoute = Literal["pool", "reject"]
SniPattern = Annotated[
    str,
    Meta(
        pattern=r"^(\*\.)?(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
        r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*$",
        description="a server name such as 'api.example.com', or a wildcard such as "
        "'*.example.com' (any name ending in '.example.com')",
    ),
]
AlpnName = Annotated[
    str, Meta(min_length=1, max_length=255, description="an ALPN protocol id such as 'h2'")
]
StatusRanges = Annotated[
    str,
    Meta(
        description="HTTP statuses such as '200', '200-399' or '200,204,300-399'",
        extra={"check": "status_ranges"},
    ),
]
RelayKind = Literal["stream", "splice", "kernel"]
TransparentRouting = Literal["check", "manage", "off"]


class _Table(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of every table: unknown keys rejected, values immutable."""


class LogConfig(_Table, frozen=True):
    """``[log]``: where the access log (and the event lines) go."""

    access: AccessTarget = "stdout"
    """``"stdout"``, ``"off"``, a file path (relative paths are relative to the config file),
    or syslog: ``"syslog:/dev/log"`` (a local socket), ``"syslog+udp://IP:PORT"`` or
    ``"syslog+tcp://IP:PORT"`` (a collector; IPv6 in brackets)."""
    events: EventsTarget = "stderr"
    """Where the event lines (``event=...``) go: ``"stderr"`` or a syslog target as above."""
    facility: Facility = "local0"
    """The syslog facility of every message (HAProxy's habit: local0)."""
    tag: SyslogTag = "l4lb"
    """The syslog APP-NAME (what rsyslog's ``$programname`` matches)."""


class KernelConfig(_Table, frozen=True):
    """``[kernel]``: when a ``relay = "kernel"`` connection leaves the splice relay for the kernel.

    Either threshold reached hands it over; either at 0 hands every connection over at once,
    right after the PROXY header (docs/balancer.md, "The kernel relay")."""

    handover_exchanges: Annotated[int, Meta(ge=0, le=MAX_COUNT)] = 3
    """Times the client speaks again after an answer (HTTP/1 keep-alive: with its 4th request)."""
    handover_after: Duration = "1s"
    """Or once the connection has lived this long and still moves bytes."""

    def handover(self) -> tuple[int, float]:
        """(exchanges, seconds), as :class:`l4lb.balancer.kernel_relay.Handover` takes them."""
        return self.handover_exchanges, values.parse_duration(self.handover_after)


class AdminConfig(_Table, frozen=True):
    """``[admin]``: the admin API / metrics / status page; only started if the table is present."""

    bind: HostPort = "127.0.0.1:9100"
    token: Token | None = None
    """Bearer token required for state-changing calls, if set (never empty)."""
    hosts: tuple[HostName, ...] = ()
    """Names accepted in requests' ``Host`` besides IP literals and localhost (DNS rebinding)."""
    keep_api_backends: bool = False
    """Whether a reload keeps the backends added (and the weights and max_conns set) through
    the API. False: a reload makes every pool what the file says, as HAProxy's does."""

    @property
    def bind_addr(self) -> tuple[str, int]:
        return values.parse_hostport(self.bind)


class HealthConfig(_Table, frozen=True):
    """``[pools.NAME.health]``: active health checks (issue 6)."""

    check: CheckKind = "tcp"
    interval: CheckInterval = "2s"
    timeout: Timeout = "1s"
    rise: PositiveInt = 2
    fall: PositiveInt = 3
    http_path: HttpPath = "/"
    http_method: HttpMethod = "GET"
    """The ``http`` check's method (HAProxy ``http-check send meth``)."""
    http_host: HostName | None = None
    """The ``http`` check's ``Host`` header (default: the backend's address)."""
    https: bool = False
    """Run the ``http`` check over TLS (HAProxy ``check-ssl``)."""
    expect_status: StatusRanges = "200-399"
    """Statuses that count as up for ``http`` (HAProxy ``http-check expect status``)."""
    sni: HostName | None = None
    """The server name sent by ``tls`` checks and ``https`` (HAProxy ``check-sni``); default:
    ``http_host`` if set, else none."""
    tls_verify: bool = False
    """Verify the backend's certificate chain and name (HAProxy ``verify required``)."""
    tls_ca_file: str | None = None
    """CA bundle for ``tls_verify`` (default: the system's); HAProxy ``ca-file``."""
    send: str | None = None
    expect: str | None = None

    def __post_init__(self) -> None:
        if self.tls_ca_file is not None and not self.tls_verify:
            raise ValueError("tls_ca_file needs tls_verify = true")
        if self.https and self.check != "http":
            raise ValueError("https = true applies to check = 'http' (use check = 'tls' alone)")
        if self.check == "send-expect" and (self.send is None or self.expect is None):
            raise ValueError("check = 'send-expect' needs both 'send' and 'expect'")
        if self.check == "send-expect" and self.expect == "":
            raise ValueError(
                "expect must not be empty: it would match any answer, even none "
                "(use check = 'tcp' to only test the connect)"
            )

    @property
    def interval_s(self) -> float:
        return values.parse_duration(self.interval)

    @property
    def expect_statuses(self) -> tuple[tuple[int, int], ...]:
        return values.parse_status_ranges(self.expect_status)

    @property
    def timeout_s(self) -> float:
        return values.parse_duration(self.timeout)


class BackendConfig(_Table, frozen=True):
    """One entry of ``pools.NAME.backends``.

    ``weight = 0`` is allowed: the backend stays configured (and health-checked) but receives no new
    connections, like HAProxy's weight 0.
    """

    address: BackendAddressText
    """``IP:PORT``; ``NAME:PORT`` (every A and AAAA address of NAME, on PORT); or
    ``srv+_SERVICE._PROTO.NAME`` (the SRV record's targets, ports and weights). Names are
    resolved at start and again when their TTL runs out (``[resolver]``)."""
    weight: Annotated[int, Meta(ge=0, le=1000)] = 1
    max_conns: Count | None = None
    send_proxy: ProxyVersion | None = None
    """Overrides the pool's ``send_proxy`` for this backend."""
    source: Source | None = None
    """Overrides the pool's ``source`` for this backend."""
    backup: bool = False
    """Only used while no non-backup backend of the pool is up (HAProxy/nginx ``backup``)."""
    slowstart: Duration | None = None
    """After coming back up, the weight ramps from ~0 to ``weight`` over this long (HAProxy
    ``slowstart``, nginx ``slow_start``); never at start."""

    @property
    def slowstart_s(self) -> float:
        return values.parse_duration(self.slowstart) if self.slowstart else 0.0

    @property
    def addr(self) -> tuple[str, int]:
        """``(ip, port)`` of an ``IP:PORT`` address (ValueError for a DNS name)."""
        return values.parse_hostport(self.address)

    @property
    def target(self) -> values.BackendAddress:
        """The parsed address: an IP, a DNS name or an SRV record."""
        return values.parse_backend_address(self.address)

    @property
    def dynamic(self) -> bool:
        """True when DNS decides this entry's addresses."""
        return self.target.dynamic


class ResolverConfig(_Table, frozen=True):
    """``[resolver]``: how backend names (``NAME:PORT``, ``srv+...``) are resolved."""

    nameservers: tuple[NameServer, ...] = ()
    """Where to ask (``IP`` or ``IP:PORT``); empty: the system's ``/etc/resolv.conf``."""
    timeout: Timeout = "2s"
    """How long one resolution (all nameservers, A and AAAA together) may take."""
    resolve_min: ResolveInterval = "1s"
    """The shortest time between two resolutions of a name, whatever its TTL (TTL 0 included)."""
    resolve_max: ResolveInterval = "5m"
    """The longest: a name is asked for again after this even when its TTL is longer."""

    def __post_init__(self) -> None:
        if values.parse_duration(self.resolve_min) > values.parse_duration(self.resolve_max):
            raise ValueError(
                f"resolve_min ({self.resolve_min}) must not be longer than "
                f"resolve_max ({self.resolve_max})"
            )

    @property
    def nameserver_addrs(self) -> tuple[tuple[str, int], ...]:
        return tuple(values.parse_nameserver(n) for n in self.nameservers)

    @property
    def timeout_s(self) -> float:
        return values.parse_duration(self.timeout)

    @property
    def resolve_min_s(self) -> float:
        return values.parse_duration(self.resolve_min)

    @property
    def resolve_max_s(self) -> float:
        return values.parse_duration(self.resolve_max)


class PoolConfig(_Table, frozen=True):
    """``[pools.NAME]``: backends and how connections reach them."""

    backends: Annotated[tuple[BackendConfig, ...], Meta(min_length=1)]
    balance: Balance = "roundrobin"
    send_proxy: ProxyVersion = "v2"
    proxy_tlvs: tuple[ProxyTlv, ...] = ()
    tls_peek_timeout: Duration = "200ms"
    connect_timeout: Timeout = "3s"
    idle_timeout: Timeout = "10m"
    client_timeout: Timeout | None = None
    """Close when the client sent nothing for this long (HAProxy ``timeout client``)."""
    server_timeout: Timeout | None = None
    """Close when the backend sent nothing for this long (HAProxy ``timeout server``)."""
    tcp_keepalive: PositiveDuration | None = None
    """SO_KEEPALIVE on the client and backend sockets, first probe after this much idleness
    (HAProxy ``option clitcpka``/``srvtcpka`` + ``*tcpka-idle``, nginx ``so_keepalive``)."""
    tcp_keepalive_interval: PositiveDuration = "10s"
    tcp_keepalive_count: Annotated[int, Meta(ge=1, le=127)] = 3
    retries: Annotated[int, Meta(ge=0, le=100)] = 2
    health: HealthConfig | None = None
    source: Source = "balancer"
    """The backend connection's local address: ``"balancer"`` (the kernel's choice),
    ``"client"`` (transparent: the real client's IP, no PROXY header; docs/transparent.md) or a
    fixed IP address of this host (HAProxy's ``source ADDR``)."""

    def __post_init__(self) -> None:
        if len(set(self.proxy_tlvs)) != len(self.proxy_tlvs):
            raise ValueError("proxy_tlvs: each TLV may appear only once")

    def backend_proxy(self, backend: BackendConfig) -> ProxyVersion:
        """The PROXY version sent to ``backend`` (its override, else the pool's)."""
        return backend.send_proxy if backend.send_proxy is not None else self.send_proxy

    def backend_source(self, backend: BackendConfig) -> str:
        """The ``source`` of ``backend`` (its override, else the pool's), normalized."""
        return source_value(backend.source if backend.source is not None else self.source)

    @property
    def connect_timeout_s(self) -> float:
        return values.parse_duration(self.connect_timeout)

    @property
    def idle_timeout_s(self) -> float:
        return values.parse_duration(self.idle_timeout)

    @property
    def tls_peek_timeout_s(self) -> float:
        return values.parse_duration(self.tls_peek_timeout)

    @property
    def client_timeout_s(self) -> float | None:
        return values.parse_duration(self.client_timeout) if self.client_timeout else None

    @property
    def server_timeout_s(self) -> float | None:
        return values.parse_duration(self.server_timeout) if self.server_timeout else None

    @property
    def keepalive(self) -> tuple[int, int, int] | None:
        """``(idle, interval, count)`` in whole seconds (at least 1), or None when off."""
        if self.tcp_keepalive is None:
            return None
        idle = max(1, round(values.parse_duration(self.tcp_keepalive)))
        interval = max(1, round(values.parse_duration(self.tcp_keepalive_interval)))
        return idle, interval, self.tcp_keepalive_count

    @property
    def peeks_tls(self) -> bool:
        """True when the header carries ClientHello data (the client's first bytes are awaited)."""
        return "authority" in self.proxy_tlvs or "alpn" in self.proxy_tlvs


MAX_DEFER_ACCEPT_S = 30
"""The longest ``defer_accept``: it bounds how long a silent client waits to be accepted."""


class RouteConfig(_Table, frozen=True):
    """One entry of a listener's ``routes``: a ClientHello match and the pool it sends to."""

    pool: str
    sni: SniPattern | None = None
    """An exact server name or ``*.domain`` (any name ending in ``.domain``); case-insensitive."""
    alpn: AlpnName | None = None
    """Matches when the client offers this protocol (any of its offers)."""
    name: Name | None = None
    """The route's name in the access log and metrics (default: ``sni`` and ``alpn``)."""

    def __post_init__(self) -> None:
        if self.sni is None and self.alpn is None:
            raise ValueError("a route needs sni, alpn or both (the listener's pool is the default)")

    @property
    def label(self) -> str:
        if self.name is not None:
            return self.name
        label = (self.sni or "*").lower()
        return f"{label}/{self.alpn}" if self.alpn is not None else label


class ListenerConfig(_Table, frozen=True):
    """One ``[[listeners]]`` entry: where clients connect, and the trust policy (issue 4)."""

    name: Name
    bind: HostPort
    pool: str
    max_conns: Count = 10000
    accept_proxy: AcceptProxy = "off"
    trusted_proxies: tuple[Cidr, ...] = ()
    proxy_header_timeout: Timeout = "5s"
    pass_tlvs: tuple[TlvName, ...] = ()
    allow: tuple[Cidr, ...] = ()
    """Empty means every client is allowed."""
    deny: tuple[Cidr, ...] = ()
    deny_file: str | None = None
    """A file with one CIDR per line (``#`` comments); relative to the config file."""
    max_conns_per_client: Count | None = None
    new_conns_per_client: Rate | None = None
    new_conns_burst: Count | None = None
    """Token bucket size for ``new_conns_per_client``; default: one second's worth (at least 1)."""
    client_v6_prefix: Annotated[int, Meta(ge=1, le=128)] = 64
    max_pending_headers: Count = 1000
    defer_accept: Duration = "0s"
    """Accept once the client's first bytes arrive, or after this long at most (Linux
    ``TCP_DEFER_ACCEPT``, whole seconds, rounded up); "0s" is off. For client-speaks-first
    protocols: a client that waits for a banner is only accepted after this delay."""
    routes: tuple[RouteConfig, ...] = ()
    """Pools chosen by the TLS ClientHello's SNI/ALPN, first match wins."""
    default: NoRoute = "pool"
    """When no route matches: ``"pool"`` uses ``pool``, ``"reject"`` resets the connection."""
    tls_peek_timeout: Duration = "1s"
    """With ``routes``: how long to wait for the ClientHello before using the default."""
    local_checks: Literal["pass", "answer"] = "pass"
    """PROXY ``LOCAL`` (v1 ``UNKNOWN``) connections from a trusted upstream are its health
    checks: "pass" hands them to a backend (an upstream HTTP check then reaches the
    application); "answer" closes them right after the header, without a backend connection
    (an upstream TCP check succeeds while l4lb runs). Either way they are counted as health
    checks, not client connections, and get no access-log line."""
    monitor: HostPort | None = None
    """A port where a plain HTTP GET answers 200 while this listener's pool has an up backend
    and the node is not stopping, 503 otherwise, with the reason (HAProxy's ``monitor-uri`` /
    ``monitor fail``): an upstream balancer checks this one service (l4lb.balancer.monitor)."""

    def __post_init__(self) -> None:
        if self.accept_proxy != "off" and not self.trusted_proxies:
            raise ValueError(
                f"accept_proxy = {self.accept_proxy!r} needs a non-empty trusted_proxies list "
                "(the upstreams allowed to send PROXY headers)"
            )
        if self.new_conns_burst is not None and self.new_conns_per_client is None:
            raise ValueError("new_conns_burst needs new_conns_per_client")
        if self.defer_accept_s > MAX_DEFER_ACCEPT_S:
            raise ValueError(
                f"defer_accept = {self.defer_accept!r} is over {MAX_DEFER_ACCEPT_S}s: a client "
                "that waits for a banner is accepted only after it (use '1s' to '3s')"
            )
        if self.default == "reject" and not self.routes:
            raise ValueError("default = 'reject' needs routes (it would refuse every connection)")
        if self.routes and values.parse_duration(self.tls_peek_timeout) == 0:
            raise ValueError(
                "tls_peek_timeout must be more than 0s with routes (the ClientHello is waited for)"
            )

    @property
    def tls_peek_timeout_s(self) -> float:
        return values.parse_duration(self.tls_peek_timeout)

    @property
    def bind_addr(self) -> tuple[str, int]:
        return values.parse_hostport(self.bind)

    @property
    def monitor_addr(self) -> tuple[str, int] | None:
        return None if self.monitor is None else values.parse_hostport(self.monitor)

    @property
    def trusted_nets(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(c) for c in self.trusted_proxies)

    @property
    def proxy_header_timeout_s(self) -> float:
        return values.parse_duration(self.proxy_header_timeout)

    @property
    def defer_accept_s(self) -> int:
        """``defer_accept`` in whole seconds for ``TCP_DEFER_ACCEPT`` (0: off)."""
        return math.ceil(values.parse_duration(self.defer_accept))

    @property
    def pass_tlv_types(self) -> frozenset[int]:
        return frozenset(values.tlv_type(t) for t in self.pass_tlvs)

    @property
    def new_conns_rate(self) -> float | None:
        """New connections per second per client, or None for no limit."""
        if self.new_conns_per_client is None:
            return None
        return values.parse_rate(self.new_conns_per_client)

    @property
    def new_conns_burst_size(self) -> int:
        rate = self.new_conns_rate
        if self.new_conns_burst is not None:
            return self.new_conns_burst
        return max(1, int(rate)) if rate is not None else 0


def _default_workers() -> int:
    return min(os.cpu_count() or 1, MAX_WORKERS)


class Config(_Table, frozen=True):
    """The whole file."""

    listeners: Annotated[tuple[ListenerConfig, ...], Meta(min_length=1)]
    pools: dict[Name, PoolConfig]
    workers: Workers = msgspec.field(default_factory=_default_workers)
    drain_timeout: Duration = "30s"
    relay: RelayKind = "splice"
    kernel: KernelConfig = msgspec.field(default_factory=KernelConfig)
    """When ``relay = "kernel"`` hands a connection to the kernel (read with that relay only)."""
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    admin: AdminConfig | None = None
    resolver: ResolverConfig = msgspec.field(default_factory=ResolverConfig)
    """How backend names are resolved (only used when a backend address is a name)."""
    anycast: AnycastConfig | None = None
    """Announce VIPs over BGP (l4lb.config.anycast)."""
    state_file: str | None = None
    """Where the admin API's changes (drain/disable, added backends, weights) are kept across
    restarts (l4lb.balancer.state_file);
    relative to the config file. None: not kept."""
    transparent_routing: TransparentRouting = "check"
    """For ``source = "client"`` backends: ``"check"`` refuses to start (or reload)
    when the routing that brings replies back is missing, naming the commands; ``"manage"``
    adds it at start and removes it at stop; ``"off"`` trusts the operator's own setup."""

    @property
    def drain_timeout_s(self) -> float:
        return values.parse_duration(self.drain_timeout)

    def listener(self, name: str) -> ListenerConfig:
        for listener in self.listeners:
            if listener.name == name:
                return listener
        raise KeyError(name)
