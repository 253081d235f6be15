"""Backends named by DNS: resolve at start, again when the answer's TTL runs out, and make the
pool follow the answer.

A backend ``address`` may be ``NAME:PORT`` (every A and AAAA address of NAME, on PORT, with the
entry's weight) or ``srv+_SERVICE._PROTO.NAME`` (the SRV records of the lowest priority: each
target's A and AAAA addresses, with the record's port and weight). One task per such entry
resolves it with dnspython, then waits the answer's TTL, bounded by ``[resolver] resolve_min``
and ``resolve_max``. Addresses that appear join the pool (after ``rise`` health checks when the
pool is checked); addresses that disappear drain, and are forgotten when their connections end.
A failed resolution (timeout, SERVFAIL, NXDOMAIN, no address) keeps the last good answer, is
logged and counted, and is retried after ``resolve_min``, doubling up to ``resolve_max``.

The pool side of it (join, drain, forget) is :meth:`l4lb.balancer.pool.Pool.sync_dns`.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from l4lb.balancer.tasks import BackgroundTasks
from l4lb.config.loader import own_listener
from l4lb.config.schema import BackendConfig, ResolverConfig
from l4lb.config.values import AddressKind, BackendAddress, format_hostport

if TYPE_CHECKING:
    from l4lb.balancer.runtime import Balancer

log = logging.getLogger("l4lb.discovery")

SRV_WEIGHT_MAX = 1000
"""SRV weights (0..65535) are clamped to the backend weight range 1..1000 (0 becomes 1: RFC 2782
gives weight 0 "a very small chance", not none)."""


class ResolveFailure(enum.Enum):
    """Why a resolution gave no usable answer (the metric's ``result`` label)."""

    TIMEOUT = "timeout"
    NXDOMAIN = "nxdomain"
    NO_ADDRESS = "no_address"
    """The name exists but has no A/AAAA (or SRV) record, or the SRV targets have none."""
    SERVFAIL = "servfail"
    """Every nameserver failed or refused to answer."""
    ERROR = "error"


class ResolveError(Exception):
    """A resolution that failed; ``reason`` says how, the message says what happened."""

    def __init__(self, reason: ResolveFailure, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Member:
    """One address a name resolved to."""

    host: str
    port: int
    weight: int


@dataclass(frozen=True, slots=True)
class Answer:
    """A resolution's addresses and the smallest TTL among the records that gave them."""

    members: tuple[Member, ...]
    ttl: float


class Resolver(Protocol):
    """What :class:`Discovery` needs: the addresses of a backend entry, or ResolveError."""

    async def lookup(self, target: BackendAddress) -> Answer: ...


class DnsResolver:
    """A :class:`Resolver` on dnspython's asyncio resolver (no cache: each call asks)."""

    def __init__(self, config: ResolverConfig) -> None:
        try:
            import dns.asyncresolver
            import dns.nameserver
            import dns.resolver
        except ImportError as err:  # the loader refuses DNS names without it: a broken install
            raise ResolveError(
                ResolveFailure.ERROR,
                "backend names need dnspython: pip install 'l4lb[dns]'",
            ) from err
        self.timeout = config.timeout_s
        addrs = config.nameserver_addrs
        try:
            self._resolver = dns.asyncresolver.Resolver(configure=not addrs)
        except dns.resolver.NoResolverConfiguration as err:
            raise ResolveError(
                ResolveFailure.ERROR,
                f"no nameserver in /etc/resolv.conf ({err}): set [resolver] nameservers",
            ) from err
        if addrs:
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in addrs
            ]
        self._resolver.cache = None

    async def lookup(self, target: BackendAddress) -> Answer:
        try:
            async with asyncio.timeout(self.timeout):
                if target.kind is AddressKind.SRV:
                    return await self._srv(target.host)
                hosts, ttl = await self._addresses(target.host)
                return Answer(tuple(Member(h, target.port, 0) for h in hosts), ttl)
        except TimeoutError:
            raise ResolveError(
                ResolveFailure.TIMEOUT, f"{target.host}: no answer within {self.timeout:g}s"
            ) from None

    async def _query(self, name: str, rdtype: str) -> tuple[list[str], float] | None:
        """The records' texts and TTL; None when the name has none of this type."""
        import dns.exception
        import dns.resolver

        try:
            answer = await self._resolver.resolve(
                name, rdtype, search=False, raise_on_no_answer=False, lifetime=self.timeout
            )
        except dns.resolver.NXDOMAIN:
            raise ResolveError(ResolveFailure.NXDOMAIN, f"{name}: no such name") from None
        except dns.resolver.NoNameservers as err:
            raise ResolveError(ResolveFailure.SERVFAIL, f"{name} {rdtype}: {err}") from None
        except dns.exception.Timeout:
            raise ResolveError(
                ResolveFailure.TIMEOUT, f"{name} {rdtype}: no answer within {self.timeout:g}s"
            ) from None
        except dns.exception.DNSException as err:
            raise ResolveError(ResolveFailure.ERROR, f"{name} {rdtype}: {err}") from None
        if answer.rrset is None:
            return None
        return [r.to_text() for r in answer.rrset], float(answer.rrset.ttl)

    async def _addresses(self, name: str) -> tuple[list[str], float]:
        """Every A and AAAA address of ``name``; ResolveError unless there is at least one."""
        found = await asyncio.gather(
            self._query(name, "A"), self._query(name, "AAAA"), return_exceptions=True
        )
        hosts: list[str] = []
        ttls: list[float] = []
        for result in found:
            if isinstance(result, BaseException):
                raise result
            if result is not None:
                hosts += [str(ipaddress.ip_address(text)) for text in result[0]]
                ttls.append(result[1])
        if not hosts:
            raise ResolveError(ResolveFailure.NO_ADDRESS, f"{name}: no A or AAAA record")
        return sorted(set(hosts)), min(ttls)

    async def _srv(self, name: str) -> Answer:
        result = await self._query(name, "SRV")
        if result is None:
            raise ResolveError(ResolveFailure.NO_ADDRESS, f"{name}: no SRV record")
        records = []
        for text in result[0]:
            fields = text.split()
            if fields[3] != ".":  # "." : the service is decidedly not available there
                records.append((int(fields[0]), int(fields[1]), int(fields[2]), fields[3]))
        if not records:
            raise ResolveError(ResolveFailure.NO_ADDRESS, f"{name}: every SRV target is '.'")
        best = min(r[0] for r in records)
        chosen = [r for r in records if r[0] == best]
        ttl = result[1]
        members: dict[tuple[str, int], Member] = {}
        for _, weight, port, target in chosen:
            try:
                hosts, host_ttl = await self._addresses(target)
            except ResolveError as err:
                if err.reason in (ResolveFailure.NXDOMAIN, ResolveFailure.NO_ADDRESS):
                    log.warning("event=srv_target_unresolved name=%s detail=%r", name, str(err))
                    continue
                raise
            ttl = min(ttl, host_ttl)
            clamped = min(SRV_WEIGHT_MAX, max(1, weight))
            for host in hosts:
                members.setdefault((host, port), Member(host, port, clamped))
        if not members:
            raise ResolveError(ResolveFailure.NO_ADDRESS, f"{name}: no SRV target has an address")
        return Answer(tuple(members.values()), ttl)


@dataclass(slots=True)
class NameRecord:
    """The running record of one DNS backend entry (for /status and the metrics)."""

    pool: str
    name: str
    """The entry's ``address`` as written (``app.internal:8443``, ``srv+_https._tcp.x``)."""
    resolutions: int = 0
    """Resolutions that gave an answer."""
    failures: dict[str, int] = field(default_factory=dict)
    """Failed resolutions by :class:`ResolveFailure` value."""
    addresses: tuple[str, ...] = ()
    """The last good answer, as backend addresses."""
    ttl: float | None = None
    last_error: str | None = None
    last_at: float | None = None
    """Wall-clock time of the last resolution (good or failed)."""
    next_in: float = 0.0
    """Seconds from ``last_at`` to the next resolution."""
    consecutive_failures: int = 0


def next_delay(ttl: float, config: ResolverConfig) -> float:
    """When to ask again after a good answer: its TTL, within resolve_min..resolve_max."""
    return min(config.resolve_max_s, max(config.resolve_min_s, ttl))


def retry_delay(failures: int, config: ResolverConfig) -> float:
    """When to ask again after ``failures`` failed resolutions in a row: resolve_min,
    doubling, at most resolve_max."""
    return min(config.resolve_max_s, config.resolve_min_s * float(2 ** min(failures - 1, 30)))


MakeResolver = Callable[[ResolverConfig], Resolver]


class Discovery(BackgroundTasks):
    """Every DNS backend entry of a balancer: one task each, restarted on reload.

    :meth:`prime` resolves every entry once before the listeners accept (so a pool made of
    names has its backends from the first connection); :meth:`start` runs the tasks.
    """

    def __init__(self, balancer: Balancer, make_resolver: MakeResolver = DnsResolver) -> None:
        self.balancer = balancer
        self.make_resolver = make_resolver
        self.records: dict[tuple[str, str], NameRecord] = {}
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._first: dict[tuple[str, str], float] = {}
        self._config = balancer.config.resolver
        self._resolver: Resolver | None = None

    def entries(self) -> list[tuple[str, BackendConfig]]:
        """The (pool, entry) pairs of the config in force that DNS resolves."""
        return [
            (name, bc)
            for name, pc in self.balancer.config.pools.items()
            for bc in pc.backends
            if bc.dynamic
        ]

    def _ensure_resolver(self) -> Resolver:
        if self._resolver is None or self._config != self.balancer.config.resolver:
            self._config = self.balancer.config.resolver
            self._resolver = self.make_resolver(self._config)
        return self._resolver

    async def prime(self) -> None:
        """Resolve every entry once (concurrently, each within ``[resolver] timeout``)."""
        entries = self.entries()
        if not entries:
            return
        self._ensure_resolver()
        delays = await asyncio.gather(
            *(self._resolve_once(p, bc, at_start=True) for p, bc in entries)
        )
        for (pool, bc), delay in zip(entries, delays, strict=True):
            self._first[(pool, bc.address)] = delay

    def start(self) -> None:
        """(Re)start one task per entry of the config in force; records of kept entries stay."""
        self.stop()
        entries = self.entries()
        keep = {(p, bc.address) for p, bc in entries}
        self.records = {k: v for k, v in self.records.items() if k in keep}
        if not entries:
            return
        try:
            self._ensure_resolver()
        except ResolveError as err:
            log.error("event=resolver_failed error=%r", str(err))
            return
        loop = asyncio.get_running_loop()
        for pool, bc in entries:
            key = (pool, bc.address)
            self._tasks[key] = loop.create_task(
                self._watch(pool, bc, self._first.pop(key, 0.0)),
                name=f"l4lb-resolve-{pool}-{bc.address}",
            )

    async def _watch(self, pool: str, entry: BackendConfig, delay: float) -> None:
        while True:
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                delay = await self._resolve_once(pool, entry)
            except Exception:  # a bug must not end this name's resolution for good
                log.exception("event=resolve_task_failed pool=%s name=%s", pool, entry.address)
                delay = self.balancer.config.resolver.resolve_max_s

    async def _resolve_once(self, pool: str, entry: BackendConfig, at_start: bool = False) -> float:
        """Resolve ``entry``, apply the answer to the pool; the seconds until the next time.

        At start (``at_start``) the addresses found are taken as up, as configured IPs are;
        later ones wait for their health checks."""
        config = self.balancer.config.resolver
        key = (pool, entry.address)
        record = self.records.setdefault(key, NameRecord(pool, entry.address))
        resolver = self._ensure_resolver()
        try:
            answer = await resolver.lookup(entry.target)
        except ResolveError as err:
            record.failures[err.reason.value] = record.failures.get(err.reason.value, 0) + 1
            record.consecutive_failures += 1
            record.last_error = str(err)
            record.last_at = time.time()
            record.next_in = retry_delay(record.consecutive_failures, config)
            log.warning(
                "event=resolve_failed pool=%s name=%s reason=%s detail=%r kept=%d retry_in=%gs",
                pool,
                entry.address,
                err.reason.value,
                str(err),
                len(record.addresses),
                record.next_in,
            )
            return record.next_in
        members = []
        for m in answer.members:
            address = format_hostport(m.host, m.port)
            loop = own_listener((m.host, m.port), self.balancer.config.listeners)
            if loop is not None:  # what `l4lb check` refuses for an IP:PORT backend
                log.error(
                    "event=resolved_to_self pool=%s name=%s address=%s listener=%s detail=%r",
                    pool,
                    entry.address,
                    address,
                    loop,
                    "left out: connections would loop back into the balancer",
                )
                continue
            weight = m.weight if entry.target.kind is AddressKind.SRV else entry.weight
            members.append(
                BackendConfig(
                    address=address,
                    weight=weight,
                    max_conns=entry.max_conns,
                    send_proxy=entry.send_proxy,
                )
            )
        record.resolutions += 1
        record.consecutive_failures = 0
        record.last_error = None
        record.last_at = time.time()
        record.ttl = answer.ttl
        record.next_in = next_delay(answer.ttl, config)
        addresses = tuple(sorted(m.address for m in members))
        if addresses != record.addresses:
            log.info(
                "event=resolved pool=%s name=%s addresses=%s ttl=%g",
                pool,
                entry.address,
                ",".join(addresses),
                answer.ttl,
            )
        record.addresses = addresses
        target = self.balancer.pools.get(pool)
        if target is not None and target.sync_dns(entry.address, members, at_start):
            self.balancer.members_changed()
        return record.next_in


def attach(balancer: Balancer, discovery: Discovery | None = None) -> Discovery:
    """Resolve the balancer's DNS backends, follow its reloads, stop with it (the runtime calls
    this once the listeners are up; ``discovery`` is the one :meth:`Discovery.prime` d)."""
    found = discovery if discovery is not None else Discovery(balancer)
    found.start()
    balancer.on_reload.append(lambda b: found.start())
    balancer.on_stop.append(lambda b: found.stop())
    balancer.discovery = found
    return found
