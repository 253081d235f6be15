"""The runtime model of pools and backends: state, counters, and the choice of a backend.

Everything an admin API, a metrics exporter or a health checker reads lives here as plain
attributes (ints, floats, an Enum): the hot path only does ``+= 1``; readers copy what they need.

A backend's :attr:`Backend.state` combines two inputs: health (``set_health``: up/down, from
active checks or passive connect failures) and the admin's choice (``set_admin``: drain,
disable, enable). Only ``UP`` backends with weight > 0 are in rotation; every algorithm also
skips a backend at its ``max_conns``.

Backup backends (``backup = true``) are given to the algorithm only while no non-backup backend
is in rotation (then all the backups in rotation share the load, as nginx's ``backup`` and
HAProxy's ``option allbackups`` do). A backend with ``slowstart`` that comes back up (health,
or an admin's enable) gets an effective weight (:attr:`Backend.eff_weight`, what the algorithms
read) that grows linearly from ``weight/100`` (at least 1) to ``weight`` over ``slowstart``; the
pool steps the ramp when it picks (at most every :data:`RAMP_STEP`), so nothing runs on a timer.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Callable
from typing import Final

from l4lb.balancer.algorithms import ALGORITHMS, Algorithm
from l4lb.balancer.transparent import Source, parse_source
from l4lb.config.schema import BackendConfig, PoolConfig
from l4lb.config.values import parse_hostport

log = logging.getLogger("l4lb.pool")

CONNECT_BUCKETS: Final[tuple[float, ...]] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.1,
    0.5,
    1.0,
)
"""Upper bounds (seconds) of the connect-latency histogram; a last bucket counts the rest."""

PROXY_VERSIONS = {"off": 0, "v1": 1, "v2": 2}

RAMP_STEP = 0.1
"""Seconds between two steps of a slow start's weight ramp (a rebuild of the algorithm each)."""

Clock = Callable[[], float]


class BackendState(enum.Enum):
    """What a backend may do: ``UP`` takes new connections, the others do not.

    ``DRAIN`` (admin) keeps existing connections running; ``DISABLED`` (admin) also ignores health
    checks until enabled; ``DOWN`` comes from health checks or consecutive connect failures.
    """

    UP = "up"
    DOWN = "down"
    DRAIN = "drain"
    DISABLED = "disabled"


class Origin(enum.Enum):
    """Where a backend came from: the config file, a DNS answer, or the admin API."""

    CONFIG = "config"
    DNS = "dns"
    API = "api"


class Backend:
    """One backend of a pool, with its live counters.

    Attributes for readers (the admin API, metrics):

    - ``address`` (as in the config), ``host``, ``port``, ``weight``, ``max_conns``,
      ``proxy_version`` (0 = none, 1, 2), ``state`` (:class:`BackendState`);
    - ``active`` connections now, ``total`` connections relayed since start (counted when the
      connect succeeds), ``bytes_in`` (client -> backend) and ``bytes_out`` (backend -> client),
      added when each connection closes;
    - ``connect_failures`` (all time; the health checker counts consecutive ones);
    - ``last_check``: a short text of the last health-check result, or None;
    - ``latency_counts`` / ``latency_sum``: connect latency histogram over
      :data:`CONNECT_BUCKETS` (``latency_counts[i]`` = connects <= ``CONNECT_BUCKETS[i]``,
      non-cumulative; the last entry counts the slower ones);
    - ``origin`` (:class:`Origin`), ``name``: the config entry a DNS backend was resolved from
      (``app.internal:8443``, ``srv+_https._tcp.app.internal``), else None;
    - ``leaving``: removed (by the API, or gone from DNS): drained, then forgotten when its last
      connection ends (:meth:`Pool.forget_drained`);
    - ``base_limits``: weight and max_conns as the config or DNS gives them; ``api_limits``:
      those set through the API (in force while not None).
    """

    __slots__ = (
        "active",
        "address",
        "admin",
        "api_limits",
        "backup",
        "base_limits",
        "bytes_in",
        "bytes_out",
        "connect_failures",
        "eff_weight",
        "health_up",
        "host",
        "last_check",
        "latency_counts",
        "latency_sum",
        "leaving",
        "max_conns",
        "name",
        "origin",
        "port",
        "proxy_version",
        "ramp_from",
        "slowstart",
        "source",
        "total",
        "weight",
    )

    def __init__(
        self,
        config: BackendConfig,
        proxy_version: int,
        origin: Origin = Origin.CONFIG,
        name: str | None = None,
    ) -> None:
        self.origin = origin
        self.name = name
        self.leaving = False
        self.base_limits: tuple[int, int | None] = (config.weight, config.max_conns)
        self.api_limits: tuple[int, int | None] | None = None
        self.address = config.address
        self.host, self.port = parse_hostport(config.address)
        self.weight = config.weight
        self.eff_weight = config.weight
        """The weight the algorithms use: ``weight``, or less during a slow start."""
        self.backup = config.backup
        self.slowstart = config.slowstart_s
        self.ramp_from: float | None = None
        """The clock's time this backend came back up, while its slow start lasts."""
        self.max_conns = config.max_conns
        self.proxy_version = proxy_version
        self.source: Source | None = None
        """Where connections to it come from; None: the balancer's own address."""
        self.health_up = True
        self.admin: BackendState | None = None
        self.active = 0
        self.total = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.connect_failures = 0
        self.last_check: str | None = None
        self.latency_counts = [0] * (len(CONNECT_BUCKETS) + 1)
        self.latency_sum = 0.0

    @property
    def state(self) -> BackendState:
        if self.admin is not None:
            return self.admin
        return BackendState.UP if self.health_up else BackendState.DOWN

    @property
    def in_rotation(self) -> bool:
        return self.admin is None and self.health_up and self.weight > 0

    def connected(self, seconds: float) -> None:
        """A connect succeeded after ``seconds``."""
        i = 0  # bisect_left(CONNECT_BUCKETS, seconds), without a module call and float boxing
        for bound in CONNECT_BUCKETS:
            if seconds <= bound:
                break
            i += 1
        self.latency_counts[i] += 1
        self.latency_sum += seconds
        self.total += 1

    def __repr__(self) -> str:
        return f"<Backend {self.address} {self.state.value} active={self.active}>"


class Pool:
    """A named set of backends, the algorithm choosing among them, and how to reach them.

    The compiled settings (``connect_timeout`` etc. in seconds) are read per connection. A pool
    object is replaced on reload when its config changes; backends with the same address carry
    over (with their counters, health and admin state), so connections in flight keep counting.
    """

    __slots__ = (
        "_adopt",
        "adds_tlvs",
        "algorithm",
        "backends",
        "by_address",
        "client_timeout",
        "clock",
        "config",
        "connect_timeout",
        "idle_timeout",
        "keepalive",
        "name",
        "on_change",
        "on_connect_result",
        "ramp_next",
        "retries",
        "server_timeout",
        "tls_peek_timeout",
        "tlv_alpn",
        "tlv_authority",
        "tlv_crc32c",
        "tlv_noop",
        "tlv_unique_id",
    )

    def __init__(
        self,
        name: str,
        config: PoolConfig,
        previous: Pool | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.name = name
        self.config = config
        self.clock = clock
        self.ramp_next: float | None = None
        """When the next slow-start step is due (None: no backend is ramping)."""
        self.connect_timeout = config.connect_timeout_s
        self.idle_timeout = config.idle_timeout_s
        self.client_timeout = config.client_timeout_s
        self.server_timeout = config.server_timeout_s
        self.keepalive = config.keepalive
        self.tls_peek_timeout = config.tls_peek_timeout_s if config.peeks_tls else 0.0
        self.retries = config.retries
        tlvs = set(config.proxy_tlvs)
        self.tlv_unique_id = "unique_id" in tlvs
        self.tlv_authority = "authority" in tlvs
        self.tlv_alpn = "alpn" in tlvs
        self.tlv_crc32c = "crc32c" in tlvs
        self.tlv_noop = "noop" in tlvs
        self.adds_tlvs = any(
            (self.tlv_unique_id, self.tlv_authority, self.tlv_alpn, self.tlv_noop, self.tlv_crc32c)
        )
        """Whether the v2 header toward this pool's backends carries a TLV of ours (or a CRC)."""
        self.backends: list[Backend] = []
        self._adopt: list[tuple[Backend, BackendConfig, int, Source | None]] = []
        """Backends kept from ``previous`` and their settings in this config, applied by
        :meth:`reconcile` when the reload is put in force (a refused reload changes nothing)."""
        old: dict[str, Backend] = previous.by_address if previous is not None else {}
        for bc in config.backends:
            if bc.dynamic:  # a DNS name: its backends come from l4lb.balancer.discovery
                continue
            version = PROXY_VERSIONS[config.backend_proxy(bc)]
            backend = old.get(bc.address)
            source = parse_source(config.backend_source(bc))
            if backend is None:
                backend = Backend(bc, version)
                backend.source = source
            else:  # still serving the running config: its new settings wait for reconcile()
                self._adopt.append((backend, bc, version, source))
            self.backends.append(backend)
        self.by_address: dict[str, Backend] = {b.address: b for b in self.backends}
        self.algorithm: Algorithm = ALGORITHMS[config.balance]()
        self.on_change: list[Callable[[Pool, Backend], None]] = []
        """Called after a backend's state changed (the admin, the metrics)."""
        self.on_connect_result: Callable[[Backend, bool, str], None] | None = None
        """Set by the health checker: told of every connect success/failure (passive checks)."""
        self.rebuild()

    def rebuild(self) -> None:
        """Give the algorithm the backends now in rotation: the non-backup ones, or, when none
        of them is, the backups."""
        self._ramp(self.clock())
        primary = [b for b in self.backends if not b.backup]
        members = [b for b in primary if b.in_rotation]
        if not members:
            backups = [b for b in self.backends if b.backup]
            if backups:
                primary, members = backups, [b for b in backups if b.in_rotation]
        self.algorithm.rebuild(members, primary)

    def pick(self, client_ip: str, exclude: tuple[Backend, ...] = ()) -> Backend | None:
        """The backend for a new connection from ``client_ip``, or None if none can take it."""
        due = self.ramp_next
        if due is not None and self.clock() >= due:
            self.rebuild()
        return self.algorithm.pick(client_ip, exclude)

    def _ramp(self, now: float) -> None:
        """Set each backend's effective weight for ``now`` (slow start)."""
        ramping = False
        for b in self.backends:
            start = b.ramp_from
            if start is None:
                b.eff_weight = b.weight
                continue
            elapsed = now - start
            if elapsed >= b.slowstart or b.weight == 0:
                b.ramp_from = None
                b.eff_weight = b.weight
                continue
            # HAProxy's ramp: from about 1% of the weight (never 0) to all of it.
            b.eff_weight = max(1, math.ceil(b.weight * max(elapsed, 0.0) / b.slowstart))
            ramping = True
        self.ramp_next = now + RAMP_STEP if ramping else None

    def backend(self, address: str) -> Backend:
        """The backend with this address (as in the config, or normalised); LookupError if none."""
        b = self.by_address.get(address)
        if b is None:
            try:
                host, port = parse_hostport(address)
            except ValueError:
                host, port = "", 0
            for candidate in self.backends:
                if (candidate.host, candidate.port) == (host, port):
                    return candidate
            raise LookupError(f"pool {self.name!r} has no backend {address!r}")
        return b

    def set_health(self, backend: Backend, up: bool, detail: str = "") -> None:
        """Health checks' verdict: up (True) or down (False). Logged when the state changes."""
        if detail:
            backend.last_check = detail
        if backend.health_up == up:
            return
        before = backend.state
        backend.health_up = up
        self._came_up(backend, before)
        self._changed(backend, before, detail)

    def set_admin(self, backend: Backend, action: str) -> BackendState:
        """The admin's ``drain``, ``disable`` or ``enable``; returns the new state."""
        states = {"drain": BackendState.DRAIN, "disable": BackendState.DISABLED, "enable": None}
        if action not in states:
            raise ValueError(f"unknown action {action!r}: expected drain, disable or enable")
        before = backend.state
        backend.admin = states[action]
        self._came_up(backend, before)
        self._changed(backend, before, f"admin {action}")
        return backend.state

    def connect_result(self, backend: Backend, ok: bool, detail: str = "") -> None:
        """A connect to ``backend`` succeeded or failed (relayed to the passive health check)."""
        if not ok:
            backend.connect_failures += 1
        hook = self.on_connect_result
        if hook is not None:
            hook(backend, ok, detail)

    def _came_up(self, backend: Backend, before: BackendState) -> None:
        """Start the slow start of a backend that just became UP (not at start)."""
        up = backend.state is BackendState.UP
        if backend.slowstart > 0 and before is not BackendState.UP and up:
            backend.ramp_from = self.clock()

    def _changed(self, backend: Backend, before: BackendState, detail: str) -> None:
        self._settle_leavers()  # a backend that came up relieves the removed ones
        after = backend.state
        if after is not before:
            log.warning(
                "event=backend_state pool=%s backend=%s from=%s to=%s detail=%r",
                self.name,
                backend.address,
                before.value,
                after.value,
                detail,
            )
        self.rebuild()
        if not any(b.in_rotation for b in self.backends):
            log.error("event=pool_empty pool=%s detail='no backend is up'", self.name)
        for callback in self.on_change:
            callback(self, backend)

    @property
    def active(self) -> int:
        return sum(b.active for b in self.backends)

    # -- membership: backends from DNS and the admin API -----------------------------------------

    @property
    def checked(self) -> bool:
        """True when new backends wait for their health checks (``rise``) before taking traffic."""
        return self.config.health is not None

    def add_backend(
        self, config: BackendConfig, origin: Origin, name: str | None = None, up: bool = False
    ) -> Backend:
        """Add a backend (from DNS or the API); it takes connections once it passes ``rise``
        health checks (at once when the pool is not checked, or when ``up``: the first answer
        at start, taken as up as configured addresses are).

        A backend still draining after a removal by the same source comes back as it was (its
        health and counters); an address the pool already has otherwise is a ``ValueError``.
        """
        found = self.by_address.get(config.address)
        if found is not None:
            if found.leaving and found.origin is origin and found.name == name:
                found.leaving = False
                found.base_limits = (config.weight, config.max_conns)
                found.api_limits = None
                self._apply_limits(found)
                before = found.state
                found.admin = None
                self._changed(found, before, f"{origin.value} added again")
                return found
            raise ValueError(
                f"pool {self.name!r} already has backend {config.address!r} "
                f"(from {found.origin.value}{' ' + found.name if found.name else ''})"
            )
        backend = Backend(config, PROXY_VERSIONS[self.config.backend_proxy(config)], origin, name)
        backend.health_up = up or not self.checked
        self.backends.append(backend)
        self.by_address[backend.address] = backend
        log.warning(
            "event=backend_added pool=%s backend=%s origin=%s%s state=%s",
            self.name,
            backend.address,
            origin.value,
            f" name={name}" if name else "",
            backend.state.value,
        )
        self.rebuild()
        for callback in self.on_change:
            callback(self, backend)
        return backend

    def remove_backend(self, backend: Backend, detail: str) -> None:
        """Take a backend out: it drains (no new connections), and is forgotten when its
        connections have ended (at once if it has none).

        Make before break: while no other backend is in rotation (its replacement is still
        being health-checked) it keeps taking connections, and drains when one is up.
        """
        backend.leaving = True
        if backend.active == 0 and not self._needed(backend):
            self._forget(backend, detail)
            return
        before = backend.state
        self._settle_leavers()
        if backend.admin is None:
            log.warning(
                "event=backend_leaving_kept pool=%s backend=%s detail=%r",
                self.name,
                backend.address,
                "no other backend is up yet: it takes connections until one is",
            )
        self._changed(backend, before, detail)

    def _needed(self, backend: Backend) -> bool:
        """True when ``backend`` is in rotation and no backend that stays is."""
        return backend.in_rotation and not any(
            b.in_rotation and not b.leaving for b in self.backends
        )

    def _settle_leavers(self) -> None:
        """Drain the leaving backends still in rotation once a backend that stays is up."""
        if not any(b.in_rotation and not b.leaving for b in self.backends):
            return
        for b in self.backends:
            if b.leaving and b.admin is None:
                before = b.state
                b.admin = BackendState.DRAIN
                log.warning(
                    "event=backend_state pool=%s backend=%s from=%s to=drain detail=%r",
                    self.name,
                    b.address,
                    before.value,
                    "leaving: another backend is up",
                )

    def forget_drained(self) -> list[Backend]:
        """Forget the removed backends whose last connection has ended; returns them."""
        gone = [b for b in self.backends if b.leaving and not b.in_rotation and b.active == 0]
        for backend in gone:
            self._forget(backend, "drained")
        return gone

    def _forget(self, backend: Backend, detail: str) -> None:
        self.backends.remove(backend)
        if self.by_address.get(backend.address) is backend:
            del self.by_address[backend.address]
        log.warning(
            "event=backend_removed pool=%s backend=%s origin=%s detail=%r",
            self.name,
            backend.address,
            backend.origin.value,
            detail,
        )
        self.rebuild()
        for callback in self.on_change:
            callback(self, backend)

    def set_limits(self, backend: Backend, weight: int, max_conns: int | None) -> None:
        """The API's weight and max_conns (None: no limit); in force until a reload (see
        :meth:`reconcile`)."""
        backend.api_limits = (weight, max_conns)
        self._apply_limits(backend)
        log.warning(
            "event=backend_limits pool=%s backend=%s weight=%d max_conns=%s",
            self.name,
            backend.address,
            weight,
            "none" if max_conns is None else max_conns,
        )
        self.rebuild()
        for callback in self.on_change:
            callback(self, backend)

    @staticmethod
    def _apply_limits(backend: Backend) -> None:
        backend.weight, backend.max_conns = backend.api_limits or backend.base_limits

    def sync_dns(self, name: str, members: list[BackendConfig], up: bool = False) -> bool:
        """Make the backends resolved from config entry ``name`` be ``members``: new addresses
        join (after their health checks), gone ones drain. True when membership changed.

        An address the pool has from another source (the config, the API, another name) is
        left to it.
        """
        mine = {b.address: b for b in self.backends if b.origin is Origin.DNS and b.name == name}
        wanted = {m.address: m for m in members}
        changed = False
        for address, member in wanted.items():
            backend = mine.get(address)
            if backend is None or backend.leaving:
                other = self.by_address.get(address)
                if other is not None and other is not backend:
                    continue
                self.add_backend(member, Origin.DNS, name, up)
                changed = True
            elif backend.base_limits != (member.weight, member.max_conns):
                backend.base_limits = (member.weight, member.max_conns)
                self._apply_limits(backend)
                self.rebuild()
        for address, backend in mine.items():
            if address not in wanted and not backend.leaving:
                self.remove_backend(backend, f"no longer in the DNS answer for {name}")
                changed = True
        return changed

    def reconcile(self, previous: Pool | None, keep_api: bool) -> None:
        """After a reload: take over the backends that ``previous`` had from DNS and the API.

        DNS backends stay while their config entry does; API backends stay when ``keep_api``
        (``[admin] keep_api_backends``), and so do the weights and max_conns set through the
        API. What does not stay drains (then is forgotten) when it has connections.
        """
        for backend, bc, version, source in self._adopt:
            backend.weight, backend.max_conns = bc.weight, bc.max_conns
            backend.proxy_version, backend.source = version, source
            backend.backup, backend.slowstart = bc.backup, bc.slowstart_s
        self._adopt = []
        entries = {bc.address: bc for bc in self.config.backends}
        configured = {bc.address for bc in self.config.backends if not bc.dynamic}
        result: list[Backend] = []
        for backend in self.backends:
            if backend.address in configured:
                if backend.origin is not Origin.CONFIG or backend.leaving:
                    backend.origin, backend.name, backend.leaving = Origin.CONFIG, None, False
                    if backend.admin is BackendState.DRAIN:
                        backend.admin = None
                bc = entries[backend.address]
                backend.base_limits = (bc.weight, bc.max_conns)
                result.append(backend)
        taken = {b.address for b in result}
        for backend in previous.backends if previous is not None else ():
            if backend.origin is Origin.CONFIG or backend.address in taken:
                continue
            if backend.origin is Origin.DNS:
                entry = entries.get(backend.name or "")
                stays = entry is not None and entry.dynamic
                if stays and entry is not None and entry.target.port:
                    backend.base_limits = (entry.weight, entry.max_conns)
            else:
                stays = keep_api
            if not stays and not backend.leaving:
                if backend.active == 0:
                    continue
                backend.leaving = True
            elif backend.leaving and backend.active == 0 and not backend.in_rotation:
                continue
            result.append(backend)
            taken.add(backend.address)
        for backend in result:
            if not keep_api:
                backend.api_limits = None
            self._apply_limits(backend)
        self.backends = result
        self.by_address = {b.address: b for b in result}
        self._settle_leavers()
        self.rebuild()
