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
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, urlencode

from l4lb.balancer import workers
from l4lb.balancer.pool import Backend, BackendState, Origin, Pool
from l4lb.balancer.reload_status import Outcome
from l4lb.config.loader import own_listener
from l4lb.config.schema import MAX_COUNT, BackendConfig
from l4lb.config.values import format_hostport, parse_hostport
from l4lb.observe import cluster
from l4lb.observe.snapshot import Snapshot, merge, snapshot_of

if TYPE_CHECKING:
    from l4lb.balancer.runtime import Balancer

log = logging.getLogger("l4lb.admin")

MEMBERSHIP = ("add", "remove", "set")
"""Backend calls that change a pool's members or their limits (``POST .../{address}/add``)."""
_PARAMS = {
    "add": ("weight", "max_conns", "send_proxy"),
    "remove": (),
    "set": ("weight", "max_conns"),
}


class Conflict(Exception):
    """The call does not fit the backend's state or origin (HTTP 409); the message says why."""


def backend_params(action: str, query: dict[str, str]) -> dict[str, Any]:
    """The checked query parameters of a membership call; ValueError naming the bad one.

    ``weight`` 0..1000, ``max_conns`` 1..1000000 or ``none``, ``send_proxy`` off|v1|v2 (add).
    """
    allowed = _PARAMS[action]
    out: dict[str, Any] = {}
    for key, text in query.items():
        if key not in allowed:
            what = ", ".join(allowed) or "none"
            raise ValueError(f"unknown parameter {key!r} for {action} (accepted: {what})")
        if key == "send_proxy":
            if text not in ("off", "v1", "v2"):
                raise ValueError(f"send_proxy={text!r}: expected off, v1 or v2")
            out[key] = text
        elif key == "max_conns" and text == "none":
            out[key] = None
        else:
            low, high = (0, 1000) if key == "weight" else (1, MAX_COUNT)
            if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
                extra = " or 'none'" if key == "max_conns" else ""
                raise ValueError(f"{key}={text!r}: expected an integer {low}..{high}{extra}")
            out[key] = int(text)
    if action == "set" and not out:
        raise ValueError("set needs weight=N and/or max_conns=N|none")
    return out


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

    def membership(
        self, pool: str, address: str, action: str, params: dict[str, str]
    ) -> dict[str, Any] | Awaitable[dict[str, Any]]:
        """Add a backend, remove it (drain, then forget), or set its weight/max_conns.

        Raises LookupError (no such pool or backend), ValueError (a bad address or parameter),
        :class:`Conflict` (the backend exists already, or is not the API's to remove).
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
        if backend.leaving:
            raise Conflict(
                f"backend {backend.address!r} is being removed (it drains until its "
                "connections end): add it again to keep it"
            )
        return found.set_admin(backend, action).value

    def _pool(self, name: str) -> Pool:
        found = self.balancer.pools.get(name)
        if found is None:
            known = ", ".join(sorted(self.balancer.pools)) or "none"
            raise LookupError(f"no pool {name!r} (pools: {known})")
        return found

    def membership(
        self, pool: str, address: str, action: str, params: dict[str, str]
    ) -> dict[str, Any]:
        found = self._pool(pool)
        values = backend_params(action, params)
        if action == "add":
            backend = self._add(found, address, values)
        else:
            backend = found.backend(address)
            if action == "remove":
                return self._remove(found, backend)
            weight = values.get("weight", backend.weight)
            max_conns = values.get("max_conns", backend.max_conns)
            found.set_limits(backend, weight, max_conns)
        return _backend_doc(found, backend)

    def _add(self, pool: Pool, address: str, values: dict[str, Any]) -> Backend:
        try:
            host, port = parse_hostport(address)
        except ValueError as err:
            raise ValueError(
                f"{err} (the API adds IP addresses; DNS names go in the config)"
            ) from None
        loop = own_listener((host, port), self.balancer.config.listeners)
        if loop is not None:
            raise ValueError(
                f"{address!r} is the balancer's own listener {loop!r}: connections would loop "
                "back into it"
            )
        config = BackendConfig(
            address=format_hostport(host, port),
            weight=values.get("weight", 1),
            max_conns=values.get("max_conns"),
            send_proxy=values.get("send_proxy"),
        )
        try:
            backend = pool.add_backend(config, Origin.API)
        except ValueError as err:
            raise Conflict(str(err)) from None
        self.balancer.members_changed()
        return backend

    def _remove(self, pool: Pool, backend: Backend) -> dict[str, Any]:
        if backend.origin is not Origin.API:
            where = (
                "the config file" if backend.origin is Origin.CONFIG else f"DNS ({backend.name})"
            )
            raise Conflict(
                f"backend {backend.address!r} comes from {where}: drain or disable it, or "
                "take it out there (and reload); remove is for backends the API added"
            )
        active = backend.active
        pool.remove_backend(backend, "removed through the API")
        self.balancer.members_changed()
        doc = {"pool": pool.name, "backend": backend.address, "removed": True, "active": active}
        doc["state"] = backend.state.value if backend.leaving else "forgotten"
        return doc

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

    async def membership(
        self, pool: str, address: str, action: str, params: dict[str, str]
    ) -> dict[str, Any]:
        doc = self.local.membership(pool, address, action, params)  # errors before fan-out
        target = f"/pools/{quote(pool, safe='')}/backends/{quote(address, safe='')}/{action}"
        if params:
            target += "?" + urlencode(params)
        failed = []
        for worker, status, body in await self._each("POST", target):
            if status != 200:
                text = body[:200].decode(errors="replace")
                log.warning(
                    "event=worker_action_failed worker=%s action=%s status=%d body=%r",
                    worker,
                    action,
                    status,
                    text,
                )
                failed.append(f"worker {worker}: " + (f"HTTP {status}" if status else "no answer"))
        if failed:
            doc["workers_failed"] = failed
        return doc

    def drain(self) -> list[str]:
        raise LookupError("POST /drain needs [anycast], which runs with workers = 1")

    async def reload(self) -> ReloadOutcome:
        """Reload this worker, then every other; the supervisor counts it once (as one)."""
        outcome = await self._reload_all()
        workers.report(Outcome(outcome.ok, outcome.errors, outcome.summary), signalled=False)
        return outcome

    async def _reload_all(self) -> ReloadOutcome:
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


def _backend_doc(pool: Pool, backend: Backend) -> dict[str, Any]:
    """What a membership call answers: the backend as it is now."""
    state = backend.state
    doc: dict[str, Any] = {
        "pool": pool.name,
        "backend": backend.address,
        "origin": backend.origin.value,
        "state": state.value,
        "weight": backend.weight,
        "max_conns": backend.max_conns,
    }
    if state is BackendState.DOWN and pool.checked and backend.total == 0:
        doc["note"] = "takes connections once it passes its health checks (rise)"
    return doc
