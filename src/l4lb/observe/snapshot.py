"""One consistent reading of the balancer's counters, shared by /status, /metrics and the page.

The runtime keeps plain integers on its listener and backend objects (nothing but ``+= 1`` on
the hot path); a :class:`Snapshot` copies them when someone asks, so the admin API, the
Prometheus collector and the status page never touch the runtime's internals themselves and
always agree with each other.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from l4lb.balancer.runtime import Balancer


@dataclass(frozen=True, slots=True)
class CheckStatus:
    """The last health-check result of a backend."""

    ok: bool
    detail: str
    duration: float
    """Seconds the check took."""
    at: float
    """Wall-clock time of the check (Unix seconds)."""
    source: str = "active"


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
    check: CheckStatus | None = None
    connect_latency: Histogram | None = None
    check_latency: Histogram | None = None


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
    """Rejections by reason (untrusted, spoofing, bad_header, header_timeout, denied, ...)."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: str
    started: float
    """Wall-clock start time of the process (Unix seconds)."""
    now: float
    listeners: tuple[ListenerStatus, ...]
    pools: tuple[PoolStatus, ...]
    reloads: int = 0
    last_reload: dict[str, Any] | None = None
    proxy_header_errors: dict[str, int] = field(default_factory=dict)
    """Bad PROXY headers received, by reason, over all listeners."""

    def to_json(self) -> dict[str, Any]:
        """The /status document (plain JSON types)."""
        doc = asdict(self)
        doc["uptime_seconds"] = round(self.now - self.started, 3)
        for pool in doc["pools"]:
            for backend in pool["backends"]:
                for name in ("connect_latency", "check_latency"):
                    hist = backend.pop(name)
                    if hist is not None:
                        counts = hist["counts"]
                        backend[f"{name}_count"] = sum(counts)
                        backend[f"{name}_sum_seconds"] = round(hist["sum"], 6)
        return doc


def snapshot_of(balancer: Balancer) -> Snapshot:
    """Read every counter of a running balancer (and its health checks) once."""
    from l4lb import __version__
    from l4lb.balancer.health import CHECK_BUCKETS, checks_of
    from l4lb.balancer.pool import CONNECT_BUCKETS

    checks = checks_of(balancer)
    listeners = []
    header_errors: dict[str, int] = {}
    for listener in balancer.listeners.values():
        rejections = dict(listener.rejections)
        for reason, count in rejections.items():
            if reason.startswith("bad_header:"):
                key = reason.split(":", 1)[1]
                header_errors[key] = header_errors.get(key, 0) + count
        host, port = listener.address
        listeners.append(
            ListenerStatus(
                name=listener.name,
                bind=f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                pool=listener.config.pool,
                active=listener.active,
                total=listener.total,
                rejected=listener.rejected,
                rejections=rejections,
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
                    r = record.last
                    check = CheckStatus(r.ok, r.detail, round(r.duration, 6), r.at, r.source)
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
                    check=check,
                    connect_latency=Histogram(
                        CONNECT_BUCKETS, tuple(b.latency_counts), b.latency_sum
                    ),
                    check_latency=check_latency,
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
        last_reload=balancer.last_reload,
        proxy_header_errors=header_errors,
    )
