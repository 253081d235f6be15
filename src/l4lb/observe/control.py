"""What the admin API steers: this worker's balancer, or every worker of it.

:class:`Control` is the admin API's view of the balancer. :class:`BalancerControl` reads and
steers one worker's :class:`~l4lb.balancer.runtime.Balancer`; with ``workers = N``,
:class:`ClusterControl` does the same for every worker (see :mod:`l4lb.observe.cluster`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import quote

from l4lb.observe import cluster
from l4lb.observe.snapshot import Snapshot, merge, snapshot_of

if TYPE_CHECKING:
    from l4lb.balancer.runtime import Balancer

log = logging.getLogger("l4lb.admin")


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    """What ``POST /reload`` (and SIGHUP) did: applied, or refused with the config's errors."""

    ok: bool
    errors: tuple[str, ...] = ()
    summary: str = ""


class Control(Protocol):
    """What the admin API needs from the running balancer (plain or awaitable answers)."""

    def snapshot(self) -> Snapshot | Awaitable[Snapshot]:
        """A fresh reading of every counter."""
        ...

    def backend_action(self, pool: str, address: str, action: str) -> str | Awaitable[str]:
        """Drain, disable or enable one backend; return its new state.

        Raises LookupError naming what was not found (pool or backend).
        """
        ...

    def drain(self) -> list[str]:
        """Anycast: withdraw the VIPs, then stop gracefully (as SIGTERM does); the VIPs withdrawn.

        Raises LookupError when there is nothing to withdraw (no ``[anycast]``).
        """
        ...

    def reload(self) -> Awaitable[ReloadOutcome]:
        """Re-read the config file and apply it, or keep the running one if it is invalid."""
        ...


class BalancerControl:
    """The :class:`Control` of a running :class:`~l4lb.balancer.runtime.Balancer`."""

    def __init__(self, balancer: Balancer) -> None:
        self.balancer = balancer

    def snapshot(self) -> Snapshot:
        return snapshot_of(self.balancer)

    def backend_action(self, pool: str, address: str, action: str) -> str:
        found = self.balancer.pools.get(pool)
        if found is None:
            known = ", ".join(sorted(self.balancer.pools)) or "none"
            raise LookupError(f"no pool {pool!r} (pools: {known})")
        backend = found.backend(address)  # LookupError naming the backend
        return found.set_admin(backend, action).value

    def drain(self) -> list[str]:
        announcer = self.balancer.announcer
        if announcer is None:
            raise LookupError(
                "no [anycast] section: nothing to withdraw (SIGTERM stops gracefully)"
            )
        withdrawn = announcer.begin_drain()
        # the stop itself is SIGTERM's path (withdraw_grace, drain_timeout), after this answer
        self.balancer.loop.call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
        return withdrawn

    async def reload(self) -> ReloadOutcome:
        errors = self.balancer.reload_file()
        if errors:
            return ReloadOutcome(False, tuple(errors))
        config = self.balancer.config
        summary = f"{len(config.listeners)} listener(s), pools: {', '.join(sorted(config.pools))}"
        return ReloadOutcome(True, summary=summary)


class ClusterControl:
    """The control of the worker that answers the admin API for every worker."""

    def __init__(self, local: BalancerControl, supervisor: int, pid: int) -> None:
        self.local = local
        self.supervisor = supervisor
        self.pid = pid

    async def _each(self, method: str, target: str) -> list[tuple[str, int, bytes]]:
        """Ask every other worker: (worker pid, status, body); status 0 = no answer."""
        names = cluster.peer_sockets(self.supervisor, self.pid)

        async def one(name: str) -> tuple[str, int, bytes]:
            worker = name.rsplit("-", 1)[-1]
            try:
                status, body = await cluster.request(name, method, target)
            except (OSError, TimeoutError) as err:
                log.warning("event=worker_unreachable worker=%s error=%r", worker, str(err))
                return worker, 0, b""
            return worker, status, body

        return list(await asyncio.gather(*(one(n) for n in names)))

    async def snapshot(self) -> Snapshot:
        own = self.local.snapshot()
        others = []
        for worker, status, body in await self._each("GET", "/snapshot"):
            if status == 200:
                try:
                    others.append(Snapshot.from_dict(json.loads(body)))
                except (ValueError, KeyError, TypeError) as err:
                    log.warning("event=worker_snapshot_bad worker=%s error=%r", worker, str(err))
        return merge(own, others)

    async def backend_action(self, pool: str, address: str, action: str) -> str:
        state = self.local.backend_action(pool, address, action)  # LookupError before fan-out
        target = f"/pools/{quote(pool, safe='')}/backends/{quote(address, safe='')}/{action}"
        for worker, status, body in await self._each("POST", target):
            if status != 200:
                log.warning(
                    "event=worker_action_failed worker=%s action=%s status=%d body=%r",
                    worker,
                    action,
                    status,
                    body[:200].decode(errors="replace"),
                )
        return state

    def drain(self) -> list[str]:
        raise LookupError("POST /drain needs [anycast], which runs with workers = 1")

    async def reload(self) -> ReloadOutcome:
        outcome = await self.local.reload()
        if not outcome.ok:
            return outcome
        errors: list[str] = []
        for worker, status, body in await self._each("POST", "/reload"):
            if status == 200:
                continue
            try:
                doc = json.loads(body)
                detail = [str(e) for e in doc.get("errors") or [doc.get("error")]]
            except (ValueError, AttributeError):
                detail = [f"HTTP {status}" if status else "no answer"]
            errors += [f"worker {worker}: {e}" for e in detail]
        return ReloadOutcome(not errors, tuple(errors), outcome.summary)
