"""What the admin API changed, kept across restarts, as HAProxy's ``server-state-file``.

With a top-level ``state_file`` (the unit's ``StateDirectory=`` is ``/var/lib/l4lb``) the
balancer writes there, whenever one of these changes and at the stop:

- the backends drained or disabled through the API;
- the backends added through the API (address, weight, max_conns, PROXY version);
- the weights and max_conns set through the API, with the file's values they replaced.

At start, before the listeners accept, they are put back, so a drained backend never takes a
connection between a restart and the operator noticing, and an API-built pool comes back whole.
A backend that is both in the config and in the state keeps the state's admin state; a weight
set through the API is put back only while the config still gives the backend the weight it
replaced (HAProxy applies a saved weight only while the configured one is unchanged).

The file is JSON (version 2; version 1, admin states only, is still read)::

    {"version": 2, "saved": <unix time>, "pools": {pool: {address: {
        "state": "drain" | "disabled",                          (absent: in rotation)
        "added": {"weight": 1, "max_conns": null, "send_proxy": "v2"},  (API-added)
        "set": {"weight": 5, "max_conns": null, "over": {"weight": 1, "max_conns": null}}}}}}

It is replaced atomically (written aside, renamed). Never fatal: an unreadable or corrupt file
is reported once (``event=state_file_ignored``; a corrupt one is moved aside to
``<name>.bad``) and the balancer starts from the config alone; an entry naming a pool or
backend the config no longer has is reported (``event=state_pool_stale``,
``event=state_entry_stale``) and dropped from the file at once, so it is reported once.

With ``workers > 1`` every worker restores from the same file, so all start alike (a worker the
supervisor restarts too, with the API's changes up to then). Every worker applies every API call
(:mod:`l4lb.observe.cluster`) and writes the file after it, so the last to apply a change writes
a file that has it, even while another worker is being restarted; worker 0 alone reports.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from l4lb.balancer import logs
from l4lb.balancer.pool import PROXY_VERSIONS, BackendState, Origin, Pool
from l4lb.config.loader import own_listener
from l4lb.config.schema import BackendConfig
from l4lb.config.values import format_hostport, parse_hostport

if TYPE_CHECKING:
    from l4lb.balancer.pool import Backend
    from l4lb.balancer.runtime import Balancer

log = logging.getLogger("l4lb.balancer")

VERSION = 2
_READABLE = (1, 2)
_ACTIONS = {"drain": "drain", "disabled": "disable"}
"""The state in the file -> the admin action that restores it."""
_PROXY_NAMES = {v: k for k, v in PROXY_VERSIONS.items()}

Limits = tuple[int, int | None]


@dataclass(frozen=True, slots=True)
class Entry:
    """What the file keeps of one backend."""

    state: str | None = None
    """``"drain"`` or ``"disabled"``; None: in rotation."""
    added: BackendConfig | None = None
    """Set for a backend added through the API: how to add it again."""
    limits: Limits | None = None
    """The weight and max_conns set through the API."""
    over: Limits | None = None
    """The config's (or DNS's) weight and max_conns that ``limits`` replaced."""


Saved = dict[str, dict[str, Entry]]


def _limits(doc: Any, where: str) -> Limits:
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected an object with weight and max_conns")
    weight, max_conns = doc.get("weight"), doc.get("max_conns")
    if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 1000:
        raise ValueError(f"{where}.weight: expected an integer 0..1000, got {weight!r}")
    if max_conns is not None and (
        not isinstance(max_conns, int) or isinstance(max_conns, bool) or max_conns < 1
    ):
        raise ValueError(f"{where}.max_conns: expected a positive integer or null")
    return weight, max_conns


def _entry(doc: Any, address: str, where: str) -> Entry:
    if isinstance(doc, str):  # version 1: the admin state alone
        doc = {"state": doc}
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected an object")
    state = doc.get("state")
    if state is not None and state not in _ACTIONS:
        raise ValueError(f"{where}: unknown state {state!r} (expected drain or disabled)")
    added = None
    if "added" in doc:
        weight, max_conns = _limits(doc["added"], f"{where}.added")
        send_proxy = doc["added"].get("send_proxy")
        if send_proxy not in (None, *PROXY_VERSIONS):
            raise ValueError(f"{where}.added.send_proxy: expected off, v1 or v2")
        added = BackendConfig(
            address=address,
            weight=weight,
            max_conns=max_conns,
            send_proxy=send_proxy,
        )
    limits = over = None
    if "set" in doc:
        limits = _limits(doc["set"], f"{where}.set")
        over = _limits(doc["set"].get("over"), f"{where}.set.over")
    return Entry(state, added, limits, over)


def read(path: Path) -> Saved:
    """The saved entries by pool and address; ValueError naming what is wrong with the file."""
    try:
        doc: Any = json.loads(path.read_bytes().decode())
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text: {err}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("version") not in _READABLE:
        raise ValueError(f"not an l4lb state file (expected an object with version {VERSION})")
    pools = doc.get("pools")
    if not isinstance(pools, dict):
        raise ValueError("'pools' is missing or not an object")
    out: Saved = {}
    for pool, entries in pools.items():
        if not isinstance(entries, dict):
            raise ValueError(f"pools.{pool}: expected an object of address: entry")
        out[str(pool)] = {}
        for address, entry in entries.items():
            out[str(pool)][str(address)] = _entry(entry, str(address), f"pools.{pool}.{address}")
    return out


def _reporter() -> bool:
    """Whether this process reports and writes: a single process, or worker 0 of several."""
    return logs.worker_index() in (None, 0)


class _Restore:
    """Puts saved entries back into a balancer; counts what was applied and what was stale."""

    def __init__(self, balancer: Balancer, path: Path, report: bool) -> None:
        self.balancer = balancer
        self.path = path
        self.report = report
        self.applied = 0
        self.stale = 0

    def _warn(self, message: str, *args: object) -> None:
        self.stale += 1
        if self.report:
            log.warning(message, *args)

    def run(self, saved: Saved) -> None:
        for pool_name, entries in saved.items():
            pool = self.balancer.pools.get(pool_name)
            if pool is None:
                self._warn(
                    "event=state_pool_stale file=%s pool=%s backends=%d detail=%r",
                    self.path,
                    pool_name,
                    len(entries),
                    "no such pool in the config: its saved backends are ignored",
                )
                continue
            for address, entry in entries.items():
                self._one(pool, address, entry)

    def _one(self, pool: Pool, address: str, entry: Entry) -> None:
        backend = _find(pool, address)
        if backend is None and entry.added is not None:
            backend = self._add(pool, entry.added)
            if backend is None:
                return
        elif backend is None:
            self._warn(
                "event=state_entry_stale file=%s pool=%s backend=%s detail=%r",
                self.path,
                pool.name,
                address,
                "no such backend in the config: ignored",
            )
            return
        elif entry.added is not None and self.report:
            log.info(
                "event=state_entry_configured pool=%s backend=%s detail=%r",
                pool.name,
                backend.address,
                "added through the API before, in the config now: the config's settings apply",
            )
        if entry.limits is not None and entry.over is not None:
            if backend.base_limits == entry.over or backend.origin is Origin.API:
                pool.set_limits(backend, *entry.limits)
            else:
                self._warn(
                    "event=state_entry_stale file=%s pool=%s backend=%s detail=%r",
                    self.path,
                    pool.name,
                    backend.address,
                    f"weight/max_conns set through the API over {_text(entry.over)}, but the "
                    f"config gives {_text(backend.base_limits)} now: the config's apply",
                )
        if entry.state is not None:
            pool.set_admin(backend, _ACTIONS[entry.state])
        self.applied += 1

    def _add(self, pool: Pool, config: BackendConfig) -> Backend | None:
        try:
            addr = parse_hostport(config.address)
        except ValueError as err:
            self._warn(
                "event=state_entry_stale file=%s pool=%s backend=%s detail=%r",
                self.path,
                pool.name,
                config.address,
                f"not an IP:PORT ({err}): ignored",
            )
            return None
        loop = own_listener(addr, self.balancer.config.listeners)
        if loop is not None:
            self._warn(
                "event=state_entry_stale file=%s pool=%s backend=%s detail=%r",
                self.path,
                pool.name,
                config.address,
                f"the balancer's own listener {loop!r} now: ignored",
            )
            return None
        normal = BackendConfig(
            address=format_hostport(*addr),
            weight=config.weight,
            max_conns=config.max_conns,
            send_proxy=config.send_proxy,
        )
        return pool.add_backend(normal, Origin.API)


def _text(limits: Limits) -> str:
    weight, max_conns = limits
    return f"weight={weight} max_conns={'none' if max_conns is None else max_conns}"


def restore(balancer: Balancer, path: Path, report: bool | None = None) -> tuple[int, int]:
    """Apply the saved entries to the balancer's pools: (how many applied, how many stale)."""
    report = _reporter() if report is None else report
    try:
        saved = read(path)
    except FileNotFoundError:
        return 0, 0
    except (OSError, ValueError) as err:
        corrupt = isinstance(err, ValueError)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        detail = "the balancer starts from the config alone"
        if corrupt and report:
            aside = path.with_name(path.name + ".bad")
            try:
                os.replace(path, aside)
                detail += f"; the file was moved aside to {aside}"
            except OSError:
                pass
        log.log(
            logging.WARNING if report else logging.DEBUG,
            "event=state_file_ignored file=%s error=%r detail=%r",
            path,
            reason,
            detail,
        )
        return 0, 0
    work = _Restore(balancer, path, report)
    work.run(saved)
    log.info("event=state_restored file=%s backends=%d stale=%d", path, work.applied, work.stale)
    return work.applied, work.stale


def _find(pool: Pool, address: str) -> Backend | None:
    try:
        return pool.backend(address)
    except LookupError:
        return None


def snapshot(balancer: Balancer) -> dict[str, dict[str, dict[str, Any]]]:
    """What the file keeps now, as written (see the module docstring)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for pool in balancer.pools.values():
        for backend in pool.backends:
            if backend.leaving:
                continue
            doc: dict[str, Any] = {}
            if backend.admin is BackendState.DRAIN:
                doc["state"] = "drain"
            elif backend.admin is BackendState.DISABLED:
                doc["state"] = "disabled"
            weight, max_conns = backend.base_limits
            if backend.origin is Origin.API:
                doc["added"] = {
                    "weight": weight,
                    "max_conns": max_conns,
                    "send_proxy": _PROXY_NAMES.get(backend.proxy_version),
                }
            if backend.api_limits is not None:
                doc["set"] = {
                    "weight": backend.api_limits[0],
                    "max_conns": backend.api_limits[1],
                    "over": {"weight": weight, "max_conns": max_conns},
                }
            if doc:
                out.setdefault(pool.name, {})[backend.address] = doc
    return out


class StateFile:
    """Keeps ``path`` in step with the balancer (see the module docstring)."""

    def __init__(self, balancer: Balancer, path: Path) -> None:
        self.balancer = balancer
        self.path = path
        self.written: dict[str, dict[str, dict[str, Any]]] | None = None
        self._pending = False

    def watch(self) -> None:
        """Follow every pool (also those a reload adds) and the stop."""
        self._follow_pools()
        self.balancer.on_reload.append(lambda b: self._after_reload())
        self.balancer.on_stop.append(lambda b: self.save())

    def _follow_pools(self) -> None:
        for pool in self.balancer.pools.values():
            if self._changed not in pool.on_change:
                pool.on_change.append(self._changed)

    def _after_reload(self) -> None:
        self._follow_pools()
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
    report = _reporter()
    _, stale = restore(balancer, path, report)
    state = StateFile(balancer, path)
    if stale == 0:
        state.written = snapshot(balancer)
    state.watch()
    if stale and report:  # drop what was reported, so it is reported once
        state.save()
    return state
