"""Admin states that survive a restart, as HAProxy's ``server-state-file``: the backends an
operator drained or disabled (admin API) are written to ``state_file`` (top-level key; the unit's
``StateDirectory=`` is ``/var/lib/l4lb``) whenever a state changes and at the stop, and put
back at start, before the listeners accept, so a drained backend never takes a connection
between the restart and the operator noticing.

The file is JSON: ``{"version": 1, "saved": <unix time>, "pools": {pool: {address: state}}}``
with state ``"drain"`` or ``"disabled"``. It is replaced atomically (written aside, renamed).
A corrupt file, or an entry naming a pool or backend the config no longer has (stale), is
reported (``event=state_file_ignored``, ``event=state_entry_stale``) and ignored, never fatal:
the balancer starts with every backend in rotation, as without a file. Backends added through the
API are not kept (they come back only from the config or DNS).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from l4lb.balancer.pool import BackendState, Pool

if TYPE_CHECKING:
    from l4lb.balancer.pool import Backend
    from l4lb.balancer.runtime import Balancer

log = logging.getLogger("l4lb.balancer")

VERSION = 1
_ACTIONS = {"drain": "drain", "disabled": "disable"}
"""The state in the file -> the admin action that restores it."""


def read(path: Path) -> dict[str, dict[str, str]]:
    """The saved states by pool and address; ValueError naming what is wrong with the file."""
    try:
        doc: Any = json.loads(path.read_text())
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text: {err}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise ValueError(f"not an l4lb state file (expected an object with version {VERSION})")
    pools = doc.get("pools")
    if not isinstance(pools, dict):
        raise ValueError("'pools' is missing or not an object")
    out: dict[str, dict[str, str]] = {}
    for pool, entries in pools.items():
        if not isinstance(entries, dict):
            raise ValueError(f"pools.{pool}: expected an object of address: state")
        for address, state in entries.items():
            if state not in _ACTIONS:
                raise ValueError(f"pools.{pool}.{address}: unknown state {state!r}")
        out[str(pool)] = {str(a): str(s) for a, s in entries.items()}
    return out


def restore(balancer: Balancer, path: Path) -> int:
    """Apply the saved states to the balancer's pools; how many were applied."""
    if not path.exists():
        return 0
    try:
        saved = read(path)
    except (OSError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        log.warning(
            "event=state_file_ignored file=%s error=%r detail=%r",
            path,
            reason,
            "every backend starts in rotation",
        )
        return 0
    applied = 0
    for pool_name, entries in saved.items():
        pool = balancer.pools.get(pool_name)
        for address, state in entries.items():
            backend = _find(pool, address)
            if pool is None or backend is None:
                log.warning(
                    "event=state_entry_stale file=%s pool=%s backend=%s state=%s detail=%r",
                    path,
                    pool_name,
                    address,
                    state,
                    "no such pool or backend in the config: ignored",
                )
                continue
            pool.set_admin(backend, _ACTIONS[state])
            applied += 1
    log.info("event=state_restored file=%s backends=%d", path, applied)
    return applied


def _find(pool: Pool | None, address: str) -> Backend | None:
    if pool is None:
        return None
    try:
        return pool.backend(address)
    except LookupError:
        return None


def snapshot(balancer: Balancer) -> dict[str, dict[str, str]]:
    """The admin states worth keeping: drained or disabled backends, by pool."""
    out: dict[str, dict[str, str]] = {}
    for pool in balancer.pools.values():
        for backend in pool.backends:
            if backend.admin is BackendState.DRAIN:
                out.setdefault(pool.name, {})[backend.address] = "drain"
            elif backend.admin is BackendState.DISABLED:
                out.setdefault(pool.name, {})[backend.address] = "disabled"
    return out


class StateFile:
    """Keeps ``path`` in step with the balancer's admin states (see the module docstring)."""

    def __init__(self, balancer: Balancer, path: Path) -> None:
        self.balancer = balancer
        self.path = path
        self.written: dict[str, dict[str, str]] | None = None
        self._pending = False

    def watch(self) -> None:
        """Follow every pool (also those a reload adds) and the stop."""
        for pool in self.balancer.pools.values():
            if self._changed not in pool.on_change:
                pool.on_change.append(self._changed)
        self.balancer.on_reload.append(lambda b: self._after_reload())
        self.balancer.on_stop.append(lambda b: self.save())

    def _after_reload(self) -> None:
        for pool in self.balancer.pools.values():
            if self._changed not in pool.on_change:
                pool.on_change.append(self._changed)
        self.save()

    def _changed(self, pool: Pool, backend: Backend) -> None:
        if not self._pending:  # one write for a burst of changes
            self._pending = True
            self.balancer.loop.call_soon(self.save)

    def save(self) -> None:
        self._pending = False
        states = snapshot(self.balancer)
        if states == self.written:
            return
        doc = {"version": VERSION, "saved": time.time(), "pools": states}
        aside = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            aside.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
            os.replace(aside, self.path)
        except OSError as err:
            log.warning(
                "event=state_file_write_failed file=%s error=%r", self.path, err.strerror or err
            )
            return
        self.written = states


def attach(balancer: Balancer) -> StateFile | None:
    """At start, before the listeners accept: restore, then keep the file up to date."""
    name = balancer.config.state_file
    if name is None:
        return None
    path = Path(name)
    restore(balancer, path)
    state = StateFile(balancer, path)
    state.written = snapshot(balancer)
    state.watch()
    return state
