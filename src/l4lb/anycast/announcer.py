"""Announce only what can serve; drain before withdraw; withdraw when the event loop hangs.

:class:`Announcer` is built by the runtime from ``[anycast]`` (:func:`make_announcer`) and
driven through four calls: :meth:`~Announcer.start` once the listeners are bound,
:meth:`~Announcer.evaluate` (every :data:`TICK` seconds, and whenever something may have changed),
:meth:`~Announcer.drain` on SIGTERM or ``POST /drain``, :meth:`~Announcer.close` at the end.

A VIP is announced when some bound listener accepts connections to it and each pool behind
those listeners has a backend in rotation (for a health-checked pool, one that passed ``rise``
checks since start). Every other case is a :class:`~l4lb.anycast.state.VipReason`.

The watchdog is a thread: if the event loop has not ticked for ``watchdog`` seconds it stops
ExaBGP, whose sessions close, so the routers withdraw this node; once the loop runs again,
ExaBGP is restarted and what can serve is announced again.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import ipaddress
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from l4lb.anycast.exabgp import ExaBgp
from l4lb.anycast.second_chance import Counters, SecondChance, SecondChanceError
from l4lb.anycast.state import SessionState, SpeakerState, VipReason
from l4lb.config.anycast import AnycastConfig

if TYPE_CHECKING:
    from l4lb.balancer.runtime import Balancer
    from l4lb.config.schema import Config

log = logging.getLogger("l4lb.anycast")

TICK = 0.2
"""Seconds between evaluations (and watchdog heartbeats)."""


class AnycastError(Exception):
    """``[anycast]`` cannot run here (ExaBGP missing, rules refused); the message says why."""


@dataclass(frozen=True, slots=True)
class VipStatus:
    vip: str
    announced: bool
    reason: VipReason
    since: float
    """Wall-clock time of the last change of ``reason``."""


@dataclass(frozen=True, slots=True)
class SessionStatus:
    neighbor: str
    state: SessionState
    since: float | None


@dataclass(frozen=True, slots=True)
class AnycastStatus:
    """What /status and /metrics show of the anycast part."""

    speaker: SpeakerState
    speaker_restarts: int
    draining: bool
    watchdog_trips: int
    vips: tuple[VipStatus, ...]
    sessions: tuple[SessionStatus, ...]
    second_chance: Counters | None


def _accepts(bind_host: str, vip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    host = ipaddress.ip_address(bind_host)
    return host == vip or (
        host.is_unspecified and (host.version == vip.version or host.version == 6)
    )


class Announcer:
    """The anycast part of one balancer; see the module docstring."""

    def __init__(
        self,
        config: AnycastConfig,
        speaker: ExaBgp,
        second_chance: SecondChance | None,
    ) -> None:
        self.config = config
        self.speaker = speaker
        self.second_chance = second_chance
        self.workdir: Path | None = None
        self.draining = False
        self._drain_started = 0.0
        self.reasons: dict[str, VipReason] = {v: VipReason.SPEAKER_DOWN for v in config.vips}
        self.since: dict[str, float] = dict.fromkeys(config.vips, time.time())
        self.watchdog_trips = 0
        self._ready_pools: set[str] = set()
        self._balancer: Balancer | None = None
        self._task: asyncio.Task[None] | None = None
        self._beat = time.monotonic()
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._counters: tuple[float, Counters] | None = None

    # -- life cycle ------------------------------------------------------------------------

    async def start(self, balancer: Balancer) -> None:
        """Install second chance, start ExaBGP, the evaluation task and the watchdog."""
        self._balancer = balancer
        if self.second_chance is not None:
            try:
                self.second_chance.install()
            except SecondChanceError as err:
                raise AnycastError(f"anycast.second_chance: {err}") from err
        balancer.on_reload.append(self._reloaded)
        self.speaker.on_change = self.evaluate
        self.workdir = Path(tempfile.mkdtemp(prefix="l4lb-anycast-"))
        await self.speaker.start(self.workdir)
        self._beat = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="l4lb-anycast")
        self._watchdog = threading.Thread(target=self._watch, name="l4lb-watchdog", daemon=True)
        self._watchdog.start()
        self.evaluate()

    def begin_drain(self) -> list[str]:
        """Withdraw every VIP now (``POST /drain``, SIGTERM); return the VIPs withdrawn."""
        withdrawn = sorted(self.speaker.routes)
        if not self.draining:
            self.draining = True
            self._drain_started = time.monotonic()
            log.warning(
                "event=anycast_draining withdrawn=%s withdraw_grace=%gs",
                ",".join(withdrawn) or "-",
                self.config.withdraw_grace_s,
            )
            self.evaluate()
        return withdrawn

    async def drain(self) -> None:
        """Withdraw every VIP, then keep accepting for ``withdraw_grace`` (routers converge)."""
        self.begin_drain()
        left = self._drain_started + self.config.withdraw_grace_s - time.monotonic()
        if left > 0:
            await asyncio.sleep(left)

    async def close(self) -> None:
        """Stop everything started (ExaBGP last but one, the rules last)."""
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.speaker.close()
        if self.second_chance is not None:
            self.second_chance.remove()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _reloaded(self, balancer: Balancer) -> None:
        """After a reload: new listeners and pools count at the next evaluation; the
        second-chance ports follow the listeners; ``[anycast]`` itself needs a restart."""
        if balancer.config.anycast != self.config:
            log.warning(
                "event=anycast_reload_ignored detail='[anycast] changes apply at the next start'"
            )
        if self.second_chance is not None:
            try:
                self.second_chance.set_ports(vip_ports(balancer.config, self.config))
            except SecondChanceError as err:
                log.error("event=second_chance_update_failed error=%r", str(err))
        self.evaluate()

    # -- evaluation ------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self._beat = time.monotonic()
            try:
                self.speaker.poll()
                self.evaluate()
            except Exception:  # a bug must not stop the announcements being kept right
                log.exception("event=anycast_evaluate_failed")

    def reason(self, vip: str) -> VipReason:
        """Why ``vip`` is (or is not) announced, from the balancer's state now."""
        if self.draining:
            return VipReason.DRAINING
        if self.speaker.state in (SpeakerState.FAILED, SpeakerState.STOPPED):
            return VipReason.SPEAKER_DOWN
        balancer = self._balancer
        if balancer is None:
            return VipReason.NOT_BOUND
        ip = ipaddress.ip_network(vip).network_address
        pools = [
            lst.config.pool for lst in balancer.listeners.values() if _accepts(lst.address[0], ip)
        ]
        if not pools:
            return VipReason.NOT_BOUND
        starting = False
        for name in pools:
            pool = balancer.pools.get(name)
            if pool is None or not any(b.in_rotation for b in pool.backends):
                return VipReason.NO_BACKEND
            if name not in self._ready_pools:
                if self._checked_up(balancer, name):
                    self._ready_pools.add(name)
                else:
                    starting = True
        return VipReason.STARTING if starting else VipReason.SERVING

    @staticmethod
    def _checked_up(balancer: Balancer, pool_name: str) -> bool:
        """A health-checked pool has a backend that passed ``rise`` checks; unchecked: True."""
        from l4lb.balancer.health import checks_of

        pool = balancer.pools[pool_name]
        if pool.config.health is None:
            return True
        checks = checks_of(balancer)
        if checks is None:
            return True
        rise = pool.config.health.rise
        for backend in pool.backends:
            record = checks.health(pool_name, backend.address)
            if backend.in_rotation and record is not None and record.successes >= rise:
                return True
        return False

    def evaluate(self) -> None:
        """Bring the announcements in line with what can serve now."""
        wanted: set[str] = set()
        now = time.time()
        for vip in self.config.vips:
            reason = self.reason(vip)
            if reason is not self.reasons.get(vip):
                log.info(
                    "event=vip_state vip=%s from=%s to=%s",
                    vip,
                    self.reasons[vip].value,
                    reason.value,
                )
                self.reasons[vip] = reason
                self.since[vip] = now
            if reason.announced:
                wanted.add(vip)
        self.speaker.set_routes(wanted)

    # -- watchdog --------------------------------------------------------------------------

    def _watch(self) -> None:
        limit = self.config.watchdog_s
        tripped = False
        while not self._stop.wait(TICK):
            late = time.monotonic() - self._beat
            if late > limit and not tripped:
                tripped = True
                self.watchdog_trips += 1
                log.error("event=watchdog_tripped stalled=%.1fs action=stop_exabgp", late)
                self.speaker.stop_from_thread()
            elif late <= limit:
                tripped = False

    # -- status ----------------------------------------------------------------------------

    def status(self) -> AnycastStatus:
        """One reading for /status and /metrics (nft counters at most once a second)."""
        counters: Counters | None = None
        if self.second_chance is not None:
            now = time.monotonic()
            if self._counters is None or now - self._counters[0] >= 1.0:
                self._counters = (now, self.second_chance.counters())
            counters = self._counters[1]
        return AnycastStatus(
            speaker=self.speaker.state,
            speaker_restarts=self.speaker.restarts,
            draining=self.draining,
            watchdog_trips=self.watchdog_trips,
            vips=tuple(
                VipStatus(
                    v,
                    self.reasons[v].announced and v in self.speaker.routes,
                    self.reasons[v],
                    self.since[v],
                )
                for v in self.config.vips
            ),
            sessions=tuple(
                SessionStatus(peer, state, self.speaker.session_changes.get(peer))
                for peer, state in self.speaker.sessions.items()
            ),
            second_chance=counters,
        )


def status_doc(status: AnycastStatus) -> dict[str, Any]:
    """``status`` as plain JSON types (the ``anycast`` part of /status and the snapshot)."""
    sc = status.second_chance
    return {
        "speaker": status.speaker.value,
        "speaker_restarts": status.speaker_restarts,
        "draining": status.draining,
        "watchdog_trips": status.watchdog_trips,
        "vips": [
            {"vip": v.vip, "announced": v.announced, "reason": v.reason.value, "since": v.since}
            for v in status.vips
        ],
        "sessions": [
            {"neighbor": s.neighbor, "state": s.state.value, "since": s.since}
            for s in status.sessions
        ],
        "second_chance": None
        if sc is None
        else {"forwarded": sc.forwarded, "taken": sc.taken, "dropped": sc.dropped},
    }


def vip_ports(config: Config, anycast: AnycastConfig) -> list[int]:
    """The ports of the listeners that accept connections to the VIPs."""
    vips = [ipaddress.ip_network(v).network_address for v in anycast.vips]
    return sorted(
        {
            lst.bind_addr[1]
            for lst in config.listeners
            if any(_accepts(lst.bind_addr[0], ip) for ip in vips)
        }
    )


def make_announcer(config: Config) -> Announcer | None:
    """The announcer for ``config`` (None without ``[anycast]``); :class:`AnycastError` if
    ExaBGP is not installed."""
    ac = config.anycast
    if ac is None:
        return None
    if importlib.util.find_spec("exabgp") is None:
        raise AnycastError(
            "[anycast] needs ExaBGP, which is not installed: pip install 'l4lb[anycast]'"
        )
    speaker = ExaBgp(ac)
    second_chance = None
    if ac.second_chance:
        vips = [ipaddress.ip_network(v).network_address for v in ac.vips]
        ports = vip_ports(config, ac)
        peers = [ipaddress.ip_address(p) for p in ac.peers]
        second_chance = SecondChance(vips, ports, peers, ac.second_chance_vni)
    return Announcer(ac, speaker, second_chance)
