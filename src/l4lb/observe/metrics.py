"""Prometheus metrics, read from the runtime's own counters when Prometheus scrapes.

Nothing from ``prometheus_client`` runs per connection: the relay only bumps plain integers on
its listener and backend objects, and :class:`BalancerCollector` turns a :class:`Snapshot` of
them into metric families at scrape time (the "custom collector" pattern of prometheus-client).

Listener and backend counts are separate families (``l4lb_connections_total{listener}`` and
``l4lb_backend_connections_total{pool,backend}``) so that summing one never double counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from l4lb.observe.snapshot import Histogram, Snapshot

STATES = ("up", "down", "drain", "disabled")
CONTENT_TYPE = CONTENT_TYPE_LATEST


def _buckets(hist: Histogram) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip(hist.bounds, hist.counts, strict=False):
        running += count
        out.append((repr(float(bound)), float(running)))
    out.append(("+Inf", float(hist.count)))
    return out


class BalancerCollector(Collector):
    """Exposes a balancer's counters; ``snapshot`` is called once per scrape."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def describe(self) -> Iterator[Metric]:
        return iter(())  # families depend on the config; don't let the registry call collect()

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        info = InfoMetricFamily("l4lb", "l4lb build information", labels=())
        info.add_metric([], {"version": snap.version})
        yield info
        yield GaugeMetricFamily(
            "l4lb_start_time_seconds", "Start time of the process (Unix seconds)", snap.started
        )
        reloads = CounterMetricFamily(
            "l4lb_reloads",
            "Configuration reloads, by result: applied, or refused (the running config kept)",
            labels=["result"],
        )
        reloads.add_metric(["applied"], snap.reloads)
        reloads.add_metric(["refused"], snap.reloads_refused)
        yield reloads
        yield CounterMetricFamily(
            "l4lb_access_log_dropped",
            "Access-log lines dropped: the target did not keep up (queue full) or failed",
            value=snap.access_log_dropped,
        )
        yield CounterMetricFamily(
            "l4lb_log_dropped",
            "Log lines dropped because stderr did not keep up",
            value=snap.log_dropped,
        )

        conns = CounterMetricFamily(
            "l4lb_connections", "Connections accepted per listener", labels=["listener"]
        )
        active = GaugeMetricFamily(
            "l4lb_connections_active", "Connections open per listener", labels=["listener"]
        )
        rejected = CounterMetricFamily(
            "l4lb_rejections",
            "Connections refused before reaching a backend, by listener and reason",
            labels=["listener", "reason"],
        )
        routed = CounterMetricFamily(
            "l4lb_route_connections",
            "Connections per listener and route taken (a route's name, or default)",
            labels=["listener", "route"],
        )
        checks = CounterMetricFamily(
            "l4lb_health_checks",
            "Upstream health checks (PROXY LOCAL) per listener: answered here or passed on",
            labels=["listener", "action"],
        )
        for lst in snap.listeners:
            for action, count in sorted(lst.health_checks.items()):
                checks.add_metric([lst.name, action], count)
            conns.add_metric([lst.name], lst.total)
            active.add_metric([lst.name], lst.active)
            for route, count in sorted(lst.routes.items()):
                routed.add_metric([lst.name, route], count)
            by_reason: dict[str, int] = {}
            for reason, count in lst.rejections.items():
                # "bad_header:<codec reason>" -> "bad_header"; the codec's reasons go to
                # l4lb_proxy_header_errors_total, so this label set stays small.
                short = reason.split(":", 1)[0]
                by_reason[short] = by_reason.get(short, 0) + count
            for reason, count in sorted(by_reason.items()):
                rejected.add_metric([lst.name, reason], count)
        yield conns
        yield active
        yield rejected
        yield routed
        yield checks

        header_errors = CounterMetricFamily(
            "l4lb_proxy_header_errors",
            "Invalid PROXY headers received from upstreams, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(snap.proxy_header_errors.items()):
            header_errors.add_metric([reason], count)
        yield header_errors

        labels = ["pool", "backend"]
        b_total = CounterMetricFamily(
            "l4lb_backend_connections", "Connections sent to each backend", labels=labels
        )
        b_active = GaugeMetricFamily(
            "l4lb_backend_connections_active", "Connections open to each backend", labels=labels
        )
        b_bytes = CounterMetricFamily(
            "l4lb_bytes",
            "Bytes relayed: direction=in from clients to the backend, out from it to clients",
            labels=[*labels, "direction"],
        )
        b_fail = CounterMetricFamily(
            "l4lb_backend_connect_failures", "Failed connects to each backend", labels=labels
        )
        b_up = GaugeMetricFamily(
            "l4lb_backend_up", "1 when the backend passes its health checks", labels=labels
        )
        b_state = GaugeMetricFamily(
            "l4lb_backend_state",
            "1 for the backend's current state (up, down, drain, disabled)",
            labels=[*labels, "state"],
        )
        b_weight = GaugeMetricFamily("l4lb_backend_weight", "Configured weight", labels=labels)
        b_eff = GaugeMetricFamily(
            "l4lb_backend_effective_weight",
            "Weight in use now (lower during a slow start)",
            labels=labels,
        )
        b_check_ok = GaugeMetricFamily(
            "l4lb_check_success", "1 when the last health check passed", labels=labels
        )
        check_hist = HistogramMetricFamily(
            "l4lb_check_duration_seconds", "Duration of active health checks", labels=labels
        )
        connect_hist = HistogramMetricFamily(
            "l4lb_connect_duration_seconds", "Time to connect to the backend", labels=labels
        )
        for pool in snap.pools:
            for be in pool.backends:
                key = [pool.name, be.address]
                b_total.add_metric(key, be.total)
                b_active.add_metric(key, be.active)
                b_bytes.add_metric([*key, "in"], be.bytes_in)
                b_bytes.add_metric([*key, "out"], be.bytes_out)
                b_fail.add_metric(key, be.connect_failures)
                b_up.add_metric(key, 0 if be.state in ("down", "disabled") else 1)
                for state in STATES:
                    b_state.add_metric([*key, state], 1 if be.state == state else 0)
                b_weight.add_metric(key, be.weight)
                eff = be.effective_weight
                b_eff.add_metric(key, be.weight if eff is None else eff)
                if be.check is not None:
                    b_check_ok.add_metric(key, 1 if be.check.ok else 0)
                if be.check_latency is not None:
                    h = be.check_latency
                    check_hist.add_metric(key, _buckets(h), h.sum)
                if be.connect_latency is not None:
                    h = be.connect_latency
                    connect_hist.add_metric(key, _buckets(h), h.sum)
        yield from (b_total, b_active, b_bytes, b_fail, b_up, b_state, b_weight, b_eff, b_check_ok)
        yield check_hist
        yield connect_hist
        if snap.dns:
            yield from _dns_metrics(snap)
        if snap.anycast is not None:
            yield from _anycast_metrics(snap.anycast)


def _dns_metrics(snap: Snapshot) -> Iterator[Metric]:
    """Backends from DNS: resolutions by result, and how many addresses the last answer had."""
    resolutions = CounterMetricFamily(
        "l4lb_dns_resolutions",
        "Resolutions of DNS-named backend entries: result=ok, or why it failed (the last good "
        "answer is kept)",
        labels=["pool", "name", "result"],
    )
    addresses = GaugeMetricFamily(
        "l4lb_dns_addresses",
        "Addresses in the last good answer of a DNS-named backend entry",
        labels=["pool", "name"],
    )
    for r in snap.dns:
        resolutions.add_metric([r.pool, r.name, "ok"], r.resolutions)
        for reason, count in sorted(r.failures.items()):
            resolutions.add_metric([r.pool, r.name, reason], count)
        addresses.add_metric([r.pool, r.name], len(r.addresses))
    yield resolutions
    yield addresses


def _anycast_metrics(doc: dict[str, Any]) -> Iterator[Metric]:
    """``[anycast]``: per VIP announced and why, per BGP session its state, second chance."""
    from l4lb.anycast.state import SessionState, VipReason

    announced = GaugeMetricFamily(
        "l4lb_anycast_vip_announced", "1 when the VIP is announced over BGP", labels=["vip"]
    )
    reason = GaugeMetricFamily(
        "l4lb_anycast_vip_reason",
        "1 for the reason the VIP is announced (serving) or not",
        labels=["vip", "reason"],
    )
    for vip in doc["vips"]:
        announced.add_metric([vip["vip"]], 1 if vip["announced"] else 0)
        for member in VipReason:
            reason.add_metric([vip["vip"], member.value], 1 if vip["reason"] == member.value else 0)
    session = GaugeMetricFamily(
        "l4lb_anycast_bgp_session_state",
        "1 for the BGP session's current state (from ExaBGP)",
        labels=["neighbor", "state"],
    )
    for s in doc["sessions"]:
        for state in SessionState:
            session.add_metric([s["neighbor"], state.value], 1 if s["state"] == state.value else 0)
    yield from (announced, reason, session)
    yield CounterMetricFamily(
        "l4lb_anycast_speaker_restarts",
        "Restarts of ExaBGP after it exited on its own",
        doc["speaker_restarts"],
    )
    yield CounterMetricFamily(
        "l4lb_anycast_watchdog_trips",
        "Times the event loop stalled past [anycast] watchdog (ExaBGP was stopped)",
        doc["watchdog_trips"],
    )
    sc = doc.get("second_chance")
    if sc is not None:
        segments = CounterMetricFamily(
            "l4lb_anycast_second_chance_segments",
            "Mid-flow segments of flows this node does not own: forwarded to the peers; "
            "peers' copies taken (owned here) or dropped (owned by no one here)",
            labels=["action"],
        )
        for action in ("forwarded", "taken", "dropped"):
            segments.add_metric([action], sc[action])
        yield segments


def make_registry(snapshot: Callable[[], Snapshot], process: bool = True) -> CollectorRegistry:
    """A registry with the balancer's collector (and the process's CPU/memory/fds)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BalancerCollector(snapshot))
    if process:
        ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition format of ``registry``."""
    return generate_latest(registry)


def render_snapshot(snapshot: Snapshot, process: bool = True) -> bytes:
    """``GET /metrics`` for one snapshot (a registry per scrape: nothing shared between them)."""
    return generate_latest(make_registry(lambda: snapshot, process))
