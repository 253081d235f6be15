"""One consistent reading of the balancer's counters, shared by /status, /metrics and the page.

The runtime keeps plain integers on its listener and backend objects (nothing but ``+= 1`` on
the hot path); a :class:`Snapshot` copies them when someone asks, so the admin API, the
Prometheus collector and the status page never touch the runtime's internals themselves and
always agree with each other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from l4lb.balancer.health import CheckResult
from l4lb.config.values import format_hostport

if TYPE_CHECKING:
    from l4lb.balancer.runtime import Balancer


@dataclass(frozen=True, slots=True)
class Histogram:
    """A cumulative-free histogram: ``counts[i]`` observations ≤ ``bounds[i]``, the last +Inf."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True, slots=True)
class BackendStatus:
    address: str
    weight: int
    state: str
    """``up``, ``down``, ``drain`` or ``disabled``."""
    active: int
    total: int
    bytes_in: int
    """Bytes from clients, sent on to this backend."""
    bytes_out: int
    """Bytes from this backend, sent on to clients."""
    connect_failures: int
    check: CheckResult | None = None
    connect_latency: Histogram | None = None
    check_latency: Histogram | None = None
    origin: str = "config"
    """Where the backend came from: ``config``, ``dns`` or ``api``."""
    name: str | None = None
    """For ``dns``: the config entry it was resolved from (``app.internal:8443``)."""
    max_conns: int | None = None
    effective_weight: int | None = None
    """The weight in use now: lower than ``weight`` during a slow start."""
    backup: bool = False


@dataclass(frozen=True, slots=True)
class ResolveStatus:
    """One DNS backend entry: its last good answer and how resolving it went."""

    pool: str
    name: str
    addresses: tuple[str, ...]
    resolutions: int
    failures: dict[str, int]
    """Failed resolutions by reason (timeout, nxdomain, no_address, servfail, error)."""
    ttl: float | None = None
    last_error: str | None = None
    last_at: float | None = None
    next_in: float = 0.0


@dataclass(frozen=True, slots=True)
class PoolStatus:
    name: str
    balance: str
    check: str | None
    """The active check's name, or None when the pool is not checked."""
    backends: tuple[BackendStatus, ...]


@dataclass(frozen=True, slots=True)
class ListenerStatus:
    name: str
    bind: str
    pool: str
    active: int
    total: int
    rejected: int
    rejections: dict[str, int] = field(default_factory=dict)
    health_checks: dict[str, int] = field(default_factory=dict)
    """Upstream health checks (PROXY LOCAL) by what was done: ``answered`` or ``passed``."""
    """Rejections by reason (untrusted, spoofing, bad_header, header_timeout, denied, ...)."""
    routes: dict[str, int] = field(default_factory=dict)
    """Connections per route taken (a route's name, or ``default``), with routes."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: str
    started: float
    """Wall-clock start time of the process (Unix seconds)."""
    now: float
    listeners: tuple[ListenerStatus, ...]
    pools: tuple[PoolStatus, ...]
    reloads: int = 0
    reloads_refused: int = 0
    last_reload: dict[str, Any] | None = None
    proxy_header_errors: dict[str, int] = field(default_factory=dict)
    """Bad PROXY headers received, by reason, over all listeners."""
    workers: int = 1
    """How many worker processes the counters add up."""
    anycast: dict[str, Any] | None = None
    """``[anycast]``: VIPs (announced, reason), BGP sessions, second-chance counters."""
    access_log_dropped: int = 0
    """Access-log lines dropped (queue full, target not writable, line too long)."""
    log_dropped: int = 0
    """Log lines dropped because stderr did not keep up."""
    dns: tuple[ResolveStatus, ...] = ()
    """Backend entries resolved by DNS."""
    stopping: bool = False
    """A stop signal was received: the node drains (readiness answers 503)."""

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Snapshot:
        """The inverse of ``dataclasses.asdict`` (what a worker sends its peers)."""

        def hist(h: dict[str, Any] | None) -> Histogram | None:
            if h is None:
                return None
            return Histogram(tuple(h["bounds"]), tuple(h["counts"]), h["sum"])

        def backend(b: dict[str, Any]) -> BackendStatus:
            check = CheckResult(**b["check"]) if b["check"] is not None else None
            rest = {
                k: v for k, v in b.items() if k not in ("check", "connect_latency", "check_latency")
            }
            return BackendStatus(
                **rest,
                check=check,
                connect_latency=hist(b["connect_latency"]),
                check_latency=hist(b["check_latency"]),
            )

        return cls(
            version=doc["version"],
            started=doc["started"],
            now=doc["now"],
            listeners=tuple(ListenerStatus(**lst) for lst in doc["listeners"]),
            pools=tuple(
                PoolStatus(
                    p["name"], p["balance"], p["check"], tuple(backend(b) for b in p["backends"])
                )
                for p in doc["pools"]
            ),
            reloads=doc["reloads"],
            reloads_refused=doc.get("reloads_refused", 0),
            last_reload=doc["last_reload"],
            proxy_header_errors=dict(doc["proxy_header_errors"]),
            workers=doc.get("workers", 1),
            anycast=doc.get("anycast"),
            access_log_dropped=doc.get("access_log_dropped", 0),
            log_dropped=doc.get("log_dropped", 0),
            stopping=doc.get("stopping", False),
            dns=tuple(
                ResolveStatus(**{**r, "addresses": tuple(r["addresses"])})
                for r in doc.get("dns", ())
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON types, histograms included (the inverse of from_dict).

        Written out rather than ``dataclasses.asdict``, which deep-copies and is several
        times slower on a large pool: this runs on the event loop that relays traffic.
        """

        def hist(h: Histogram | None) -> dict[str, Any] | None:
            if h is None:
                return None
            return {"bounds": list(h.bounds), "counts": list(h.counts), "sum": h.sum}

        def check(c: CheckResult | None) -> dict[str, Any] | None:
            if c is None:
                return None
            return {
                "ok": c.ok,
                "detail": c.detail,
                "duration": c.duration,
                "at": c.at,
                "source": c.source,
            }

        return {
            "version": self.version,
            "started": self.started,
            "now": self.now,
            "listeners": [
                {
                    "name": lst.name,
                    "bind": lst.bind,
                    "pool": lst.pool,
                    "active": lst.active,
                    "total": lst.total,
                    "rejected": lst.rejected,
                    "rejections": dict(lst.rejections),
                    "routes": dict(lst.routes),
                    "health_checks": dict(lst.health_checks),
                }
                for lst in self.listeners
            ],
            "pools": [
                {
                    "name": p.name,
                    "balance": p.balance,
                    "check": p.check,
                    "backends": [
                        {
                            "address": b.address,
                            "weight": b.weight,
                            "state": b.state,
                            "active": b.active,
                            "total": b.total,
                            "bytes_in": b.bytes_in,
                            "bytes_out": b.bytes_out,
                            "connect_failures": b.connect_failures,
                            "check": check(b.check),
                            "connect_latency": hist(b.connect_latency),
                            "check_latency": hist(b.check_latency),
                            "origin": b.origin,
                            "name": b.name,
                            "max_conns": b.max_conns,
                            "effective_weight": b.effective_weight,
                            "backup": b.backup,
                        }
                        for b in p.backends
                    ],
                }
                for p in self.pools
            ],
            "reloads": self.reloads,
            "reloads_refused": self.reloads_refused,
            "last_reload": self.last_reload,
            "proxy_header_errors": dict(self.proxy_header_errors),
            "workers": self.workers,
            "anycast": self.anycast,
            "access_log_dropped": self.access_log_dropped,
            "log_dropped": self.log_dropped,
            "stopping": self.stopping,
            "dns": [
                {
                    "pool": r.pool,
                    "name": r.name,
                    "addresses": list(r.addresses),
                    "resolutions": r.resolutions,
                    "failures": dict(r.failures),
                    "ttl": r.ttl,
                    "last_error": r.last_error,
                    "last_at": r.last_at,
                    "next_in": r.next_in,
                }
                for r in self.dns
            ],
        }

    def to_json(self) -> dict[str, Any]:
        """The /status document: histograms reduced to their count and sum."""
        doc = self.to_dict()
        doc["uptime_seconds"] = round(self.now - self.started, 3)
        for pool in doc["pools"]:
            for backend in pool["backends"]:
                for name in ("connect_latency", "check_latency"):
                    hist = backend.pop(name)
                    if hist is not None:
                        backend[f"{name}_count"] = sum(hist["counts"])
                        backend[f"{name}_sum_seconds"] = round(hist["sum"], 6)
        return doc


def snapshot_of(balancer: Balancer) -> Snapshot:
    """Read every counter of a running balancer (and its health checks) once."""
    from l4lb import __version__
    from l4lb.balancer import logs
    from l4lb.balancer.health import CHECK_BUCKETS, checks_of
    from l4lb.balancer.pool import CONNECT_BUCKETS
    from l4lb.observe import access_log

    checks = checks_of(balancer)
    listeners = []
    header_errors: dict[str, int] = {}
    for listener in balancer.listeners.values():
        rejections = dict(listener.rejections)
        for reason, count in rejections.items():
            if reason.startswith("bad_header:"):
                key = reason.split(":", 1)[1]
                header_errors[key] = header_errors.get(key, 0) + count
        try:
            host, port = listener.address
        except OSError:  # stopped accepting (draining): the socket is closed
            host, port = listener.config.bind_addr
        listeners.append(
            ListenerStatus(
                name=listener.name,
                bind=format_hostport(host, port),
                pool=listener.config.pool,
                active=listener.active,
                total=listener.total,
                rejected=listener.rejected,
                rejections=rejections,
                routes=dict(listener.route_counts),
                health_checks=dict(listener.admission.health_checks),
            )
        )
    pools = []
    for pool in balancer.pools.values():
        health = pool.config.health
        backends = []
        for b in pool.backends:
            record = checks.health(pool.name, b.address) if checks is not None else None
            check = check_latency = None
            if record is not None:
                if record.last is not None:
                    check = replace(record.last, duration=round(record.last.duration, 6))
                check_latency = Histogram(
                    CHECK_BUCKETS, tuple(record.check_buckets), record.check_seconds
                )
            backends.append(
                BackendStatus(
                    address=b.address,
                    weight=b.weight,
                    state=b.state.value,
                    active=b.active,
                    total=b.total,
                    bytes_in=b.bytes_in,
                    bytes_out=b.bytes_out,
                    connect_failures=b.connect_failures,
                    effective_weight=b.eff_weight,
                    backup=b.backup,
                    check=check,
                    connect_latency=Histogram(
                        CONNECT_BUCKETS, tuple(b.latency_counts), b.latency_sum
                    ),
                    check_latency=check_latency,
                    origin=b.origin.value,
                    name=b.name,
                    max_conns=b.max_conns,
                )
            )
        pools.append(
            PoolStatus(
                name=pool.name,
                balance=pool.config.balance,
                check=health.check if health is not None else None,
                backends=tuple(backends),
            )
        )
    return Snapshot(
        version=__version__,
        started=balancer.started,
        now=time.time(),
        listeners=tuple(listeners),
        pools=tuple(pools),
        reloads=balancer.reloads,
        reloads_refused=balancer.reloads_refused,
        last_reload=balancer.last_reload,
        proxy_header_errors=header_errors,
        anycast=_anycast(balancer),
        access_log_dropped=access_log.dropped(),
        log_dropped=logs.dropped(),
        dns=_dns(balancer),
        stopping=balancer.stopping or balancer.draining,
    )


def _dns(balancer: Balancer) -> tuple[ResolveStatus, ...]:
    found = balancer.discovery
    if found is None:
        return ()
    return tuple(
        ResolveStatus(
            pool=r.pool,
            name=r.name,
            addresses=r.addresses,
            resolutions=r.resolutions,
            failures=dict(r.failures),
            ttl=r.ttl,
            last_error=r.last_error,
            last_at=r.last_at,
            next_in=round(r.next_in, 3),
        )
        for r in found.records.values()
    )


def _anycast(balancer: Balancer) -> dict[str, Any] | None:
    announcer = getattr(balancer, "announcer", None)
    if announcer is None:
        return None
    from l4lb.anycast.announcer import status_doc

    return status_doc(announcer.status())


def _add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for key, value in b.items():
        out[key] = out.get(key, 0) + value
    return out


def _add_hist(a: Histogram | None, b: Histogram | None) -> Histogram | None:
    if a is None or b is None or a.bounds != b.bounds:
        return a if a is not None else b
    return Histogram(
        a.bounds, tuple(x + y for x, y in zip(a.counts, b.counts, strict=True)), a.sum + b.sum
    )


def merge(own: Snapshot, others: list[Snapshot]) -> Snapshot:
    """Add up the counters of several workers; states, checks and settings are ``own``'s.

    Listeners and backends are matched by name and address; one that a worker does not know
    (a reload still in progress there) adds nothing.
    """
    listeners = {lst.name: lst for lst in own.listeners}
    backends = {(p.name, b.address): b for p in own.pools for b in p.backends}
    header_errors = own.proxy_header_errors
    for other in others:
        header_errors = _add(header_errors, other.proxy_header_errors)
        for lst in other.listeners:
            mine = listeners.get(lst.name)
            if mine is not None:
                listeners[lst.name] = replace(
                    mine,
                    active=mine.active + lst.active,
                    total=mine.total + lst.total,
                    rejected=mine.rejected + lst.rejected,
                    rejections=_add(mine.rejections, lst.rejections),
                    routes=_add(mine.routes, lst.routes),
                    health_checks=_add(mine.health_checks, lst.health_checks),
                )
        for pool in other.pools:
            for b in pool.backends:
                found = backends.get((pool.name, b.address))
                if found is not None:
                    backends[(pool.name, b.address)] = replace(
                        found,
                        active=found.active + b.active,
                        total=found.total + b.total,
                        bytes_in=found.bytes_in + b.bytes_in,
                        bytes_out=found.bytes_out + b.bytes_out,
                        connect_failures=found.connect_failures + b.connect_failures,
                        connect_latency=_add_hist(found.connect_latency, b.connect_latency),
                        check_latency=_add_hist(found.check_latency, b.check_latency),
                    )
    resolves = {(r.pool, r.name): r for r in own.dns}
    for other in others:
        for r in other.dns:
            seen = resolves.get((r.pool, r.name))
            if seen is not None:
                resolves[(r.pool, r.name)] = replace(
                    seen,
                    resolutions=seen.resolutions + r.resolutions,
                    failures=_add(seen.failures, r.failures),
                )
    return replace(
        own,
        dns=tuple(resolves[(r.pool, r.name)] for r in own.dns),
        listeners=tuple(listeners[lst.name] for lst in own.listeners),
        pools=tuple(
            replace(p, backends=tuple(backends[(p.name, b.address)] for b in p.backends))
            for p in own.pools
        ),
        proxy_header_errors=header_errors,
        started=min([own.started, *(o.started for o in others)]),
        workers=own.workers + sum(o.workers for o in others),
        access_log_dropped=own.access_log_dropped + sum(o.access_log_dropped for o in others),
        log_dropped=own.log_dropped + sum(o.log_dropped for o in others),
        stopping=own.stopping or any(o.stopping for o in others),
    )
