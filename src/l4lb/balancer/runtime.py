"""The running balancer: listeners, pools, live connections, reload and graceful stop.

:class:`Balancer` is the object the admin API, the metrics and the health checks read and steer:

- ``listeners``: name -> :class:`~l4lb.balancer.listener.Listener` (``active``, ``total``,
  ``rejected``, ``rejections``);
- ``pools``: name -> :class:`~l4lb.balancer.pool.Pool` (``backends``, each a
  :class:`~l4lb.balancer.pool.Backend` with its state and counters; ``pool.set_health``,
  ``pool.set_admin``);
- ``connections``: the live connections; ``config``: the config in force; ``started``,
  ``reloads``, ``last_reload``;
- :meth:`reload` (a validated Config) and :meth:`reload_file` (re-read the file, as SIGHUP does);
- ``on_reload`` / ``on_stop``: callbacks run after each applied reload and when stopping.

Its parts are passed in or built here from the config, never patched in: the listening-socket
factory (``open_socket``: workers hand over inherited sockets through it), and, once the listeners
are up, the health checks, the admin API and the systemd notifications (:func:`attach_parts`;
each follows reloads itself).

A reload is all or nothing: everything new (access log, sockets, listeners, trust policies,
pools) is built first, and only when all of it exists is it swapped in.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from l4lb.anycast.announcer import Announcer, AnycastError, make_announcer
from l4lb.balancer import (
    discovery,
    health,
    kernel_relay,
    logs,
    monitor,
    reload_status,
    state_file,
    transparent,
    workers,
)
from l4lb.balancer.admission import Admission, Rejected
from l4lb.balancer.connection import Connection, State
from l4lb.balancer.listener import BindError, Listener, OpenSocket, open_listening_socket
from l4lb.balancer.pool import Pool
from l4lb.balancer.relay_contract import EndReason, StartRelay, get_relay
from l4lb.balancer.signals import StopMode, StopSignals
from l4lb.config.loader import ConfigError, load_config
from l4lb.config.schema import Config, ListenerConfig
from l4lb.config.values import format_hostport
from l4lb.observe import admin, systemd
from l4lb.observe.access_log import AccessLog

log = logging.getLogger("l4lb.balancer")

_PROXY_NAMES = ("off", "v1", "v2")


@dataclass
class _Staged:
    """A reload's new parts, built before anything running is touched."""

    start_relay: StartRelay
    pools: dict[str, Pool]
    access_log: AccessLog | None = None
    listeners: dict[str, Listener] = field(default_factory=dict)
    """Listeners on newly bound sockets (new names, or a changed bind)."""
    admissions: dict[str, Admission | None] = field(default_factory=dict)
    """For kept listeners: a new Admission when the trust policy changed, else None."""

    def discard(self) -> None:
        for listener in self.listeners.values():
            listener.sock.close()
        if self.access_log is not None:
            self.access_log.close(wait=False)


class Balancer:
    """Listeners and pools of one worker process; see the module docstring for readers."""

    def __init__(
        self,
        config: Config,
        config_path: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        open_socket: OpenSocket = open_listening_socket,
        announcer: Announcer | None = None,
    ) -> None:
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        self.config = config
        self.config_path = config_path
        self.open_socket = open_socket
        """Makes each listener's socket: ``(host, port) -> socket``; BindError if it cannot."""
        self.start_relay = get_relay(config.relay, config.kernel.handover())
        self.pools: dict[str, Pool] = {name: Pool(name, pc) for name, pc in config.pools.items()}
        self.listeners: dict[str, Listener] = {}
        self.connections: set[Connection] = set()
        self.access_log = AccessLog(
            config.log.access, facility=config.log.facility, tag=config.log.tag
        )
        self.started = time.time()
        self.reloads = 0
        self.last_reload: dict[str, Any] | None = None
        self.stopping = False
        self.reloads_refused = 0
        self.on_reload_refused: list[Callable[[Balancer, list[str]], None]] = []
        self.draining = False
        """A stop signal arrived (set before an anycast withdraw): readiness answers 503."""
        self.on_reload: list[Callable[[Balancer], None]] = []
        self.on_stop: list[Callable[[Balancer], None]] = []
        self.health_checks: health.HealthChecks | None = None
        """Set by :func:`attach_parts` (the runtime's health checks, for /status and /metrics)."""
        self.discovery: discovery.Discovery | None = None
        """Set by :func:`attach_parts`: the DNS backends' resolution (/status, /metrics)."""
        self._sweeper: asyncio.TimerHandle | None = None
        self.announcer = announcer
        """``[anycast]``: announces the VIPs while this balancer can serve them."""
        self.routing: transparent.Routing | None = None
        """Transparent mode's routing installed by l4lb (``transparent_routing = "manage"``)."""

    # -- start -------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind every listener (all or none: :class:`BindError` leaves nothing bound), accept.

        :class:`~l4lb.balancer.transparent.TransparentError` first when transparent backends
        lack what they need (nothing bound then).
        """
        self.routing = transparent.prepare(self.config, self.routing)
        staged = _Staged(self.start_relay, self.pools)
        try:
            self._new_listeners(self.config.listeners, staged)
        except BaseException:
            staged.discard()
            raise
        for listener in staged.listeners.values():
            self._listen(listener)
        self._schedule_sweep()

    def _new_listeners(self, configs: Iterable[ListenerConfig], staged: _Staged) -> None:
        """Bind and build a listener for each of ``configs`` into ``staged`` (not started)."""
        for lc in configs:
            sock = self.open_socket(*lc.bind_addr)
            try:
                staged.listeners[lc.name] = Listener(self, lc, sock, staged.start_relay)
            except BaseException:
                sock.close()
                raise

    def _listen(self, listener: Listener) -> None:
        """Start accepting on a built listener, and say so."""
        self.listeners[listener.name] = listener
        listener.start()
        log.info(
            "event=listening listener=%s bind=%s pool=%s",
            listener.name,
            format_hostport(*listener.address),
            listener.config.pool,
        )

    # -- idle sweep --------------------------------------------------------------------------

    def _sweep_interval(self) -> float:
        timeouts = [p.idle_timeout for p in self.pools.values()]
        for p in self.pools.values():
            timeouts += [t for t in (p.client_timeout, p.server_timeout) if t is not None]
        shortest = min(timeouts, default=60.0)
        return min(5.0, max(0.05, shortest / 10))

    def _schedule_sweep(self) -> None:
        self._sweeper = self.loop.call_later(self._sweep_interval(), self._sweep)

    def _sweep(self) -> None:
        """Close relayed connections that moved no byte for their pool's idle_timeout, whose
        client sent nothing for its client_timeout, or whose backend sent nothing for its
        server_timeout.

        One pass over the connections instead of a timer per connection: each pass compares
        the byte counters with the previous pass, so the hot path only counts bytes.
        """
        now = self.loop.time()
        kernel_relay.refresh(self.loop)  # its bytes bypass this process: counters from the map
        idle: list[tuple[Connection, EndReason]] = []
        for conn in self.connections:
            if conn.state is not State.RELAYING:
                continue
            pool = conn.pool
            moved = conn.bytes_from_client + conn.bytes_to_client
            if conn.progress.stalled(moved, now, pool.idle_timeout):
                idle.append((conn, EndReason.IDLE_TIMEOUT))
            elif pool.client_timeout is not None and conn.client_progress.stalled(
                conn.bytes_from_client, now, pool.client_timeout
            ):
                idle.append((conn, EndReason.CLIENT_TIMEOUT))
            elif pool.server_timeout is not None and conn.server_progress.stalled(
                conn.bytes_to_client, now, pool.server_timeout
            ):
                idle.append((conn, EndReason.SERVER_TIMEOUT))
        for conn, reason in idle:
            conn.close(reason)
        if any([pool.forget_drained() for pool in self.pools.values()]):
            self.members_changed()
        if not self.stopping:
            self._schedule_sweep()

    # -- membership ------------------------------------------------------------------------

    def members_changed(self) -> None:
        """A pool gained or lost a backend (DNS, the API, a drained one forgotten): the health
        checks follow (a new backend is checked, ``rise`` times, before it takes traffic)."""
        if self.health_checks is not None:
            self.health_checks.attach(self.pools.values())

    # -- logs --------------------------------------------------------------------------------

    def log_connection(self, conn: Connection, reason: EndReason, detail: str) -> None:
        """The access-log line of a connection that ended (none for an upstream's health
        check, which would log one line per check interval)."""
        admitted = conn.admitted
        if not self.access_log.enabled or admitted.health_check:
            return
        upstream = admitted.upstream
        backend = conn.backend or (conn.tried[-1] if conn.tried else None)
        record: dict[str, Any] = {
            "event": "connection",
            "listener": conn.listener.name,
            "sni": conn.authority,
            "alpn": conn.alpn.decode("ascii", "replace") if conn.alpn is not None else None,
            "alpn_offers": [a.decode("ascii", "replace") for a in conn.alpn_offers],
            "route": conn.route,
            "pool": conn.pool.name if reason is not EndReason.NO_ROUTE else None,
            "client": format_hostport(admitted.client[0], admitted.client[1]),
            "upstream": format_hostport(upstream[0], upstream[1]) if upstream else None,
            "backend": backend.address if backend is not None else None,
            "proxy": _PROXY_NAMES[conn.proxy_version],
            "unique_id": conn.unique_id,
            "bytes_from_client": conn.bytes_from_client,
            "bytes_to_client": conn.bytes_to_client,
            "duration": round(time.monotonic() - conn.started, 6),
            "end": reason,
        }
        if detail:
            record["detail"] = detail
        self.access_log.write(record)

    def log_rejection(self, listener: Listener, rejected: Rejected) -> None:
        """The access-log line of a connection refused by admission."""
        if not self.access_log.enabled:
            return
        client = rejected.client
        self.access_log.write(
            {
                "event": "rejected",
                "listener": listener.name,
                "peer": format_hostport(rejected.peer[0], rejected.peer[1]),
                "client": format_hostport(client[0], client[1]) if client else None,
                "reason": rejected.reason,
                "detail": rejected.detail,
            }
        )

    # -- reload ------------------------------------------------------------------------------

    def reload(self, new: Config) -> None:
        """Apply a validated config, all or nothing: on any error (a bind, a trust policy, the
        access log) it raises and nothing has changed.

        New listeners bind, removed ones stop accepting (their connections run on), changed
        pools apply to new connections; connections in flight keep their pool and backend.
        """
        staged = self._stage(new)
        self._swap(new, staged)
        self.reloads += 1
        self.last_reload = {"time": time.time(), "ok": True, "errors": []}
        log.info(
            "event=reloaded listeners=%s pools=%s",
            ",".join(self.listeners),
            ",".join(self.pools),
        )
        if staged.access_log is None:  # the same target: follow a rotated file
            self.access_log.reopen()
        logs.events_to(new.log.events, new.log.facility, new.log.tag)  # the same: reconnect
        summary = f"listeners={','.join(self.listeners)} pools={','.join(self.pools)}"
        if not workers.is_worker():  # else the supervisor, once for every worker
            reload_status.write(os.getpid(), True, summary=summary)
        for callback in self.on_reload:
            callback(self)

    def _stage(self, new: Config) -> _Staged:
        """Build what ``new`` needs that is not running yet; raises with nothing left behind."""
        self.routing = transparent.prepare(new, self.routing)  # TransparentError
        start_relay = self.start_relay
        if new.relay != self.config.relay or (
            new.relay == "kernel" and new.kernel != self.config.kernel
        ):
            start_relay = get_relay(new.relay, new.kernel.handover())
        pools: dict[str, Pool] = {}
        for name, pc in new.pools.items():
            old = self.pools.get(name)
            pools[name] = old if old is not None and old.config == pc else Pool(name, pc, old)
        staged = _Staged(start_relay, pools)
        try:
            reopen = new.log != self.config.log or new.log.access not in ("off", "stdout")
            if reopen:  # reopened on every reload: logrotate-friendly
                staged.access_log = AccessLog(
                    new.log.access, facility=new.log.facility, tag=new.log.tag
                )
            fresh = []
            for lc in new.listeners:
                current = self.listeners.get(lc.name)
                if current is None or current.config.bind_addr != lc.bind_addr:
                    fresh.append(lc)
                else:
                    staged.admissions[lc.name] = current.prepare(lc)
            self._new_listeners(fresh, staged)
        except BaseException:
            staged.discard()
            raise
        return staged

    def _swap(self, new: Config, staged: _Staged) -> None:
        """Put the staged parts in force (nothing here can fail on the new config)."""
        for name, old in self.pools.items():
            pool = staged.pools.get(name)
            if pool is not None and pool is not old:
                # the new pool object inherits the backends; keep its hooks (health, admin)
                pool.on_change = old.on_change
                pool.on_connect_result = old.on_connect_result
        keep_api = new.admin is not None and new.admin.keep_api_backends
        for name, pool in staged.pools.items():
            pool.reconcile(self.pools.get(name), keep_api)  # DNS and API backends
        self.pools = staged.pools
        self.start_relay = staged.start_relay
        names = {lc.name for lc in new.listeners}
        for name, listener in list(self.listeners.items()):
            if name not in names or name in staged.listeners:
                listener.stop_accepting()
                del self.listeners[name]
                log.info("event=listener_stopped listener=%s", name)
        for lc in new.listeners:
            if lc.name in staged.listeners:
                self._listen(staged.listeners[lc.name])
            else:
                self.listeners[lc.name].reconfigure(lc, staged.admissions[lc.name])
        self.listeners = {lc.name: self.listeners[lc.name] for lc in new.listeners}
        if staged.access_log is not None:
            old_log = self.access_log
            self.access_log = staged.access_log
            old_log.close(wait=False)
        self.config = new

    def reload_file(self) -> list[str]:
        """Re-read the config file and apply it; return its errors (empty when applied).

        An invalid file, or a bind failure, leaves the running config in force.
        """
        if self.config_path is None:
            return ["no config file to reload"]
        try:
            new = load_config(self.config_path)
            self.reload(new)
        except ConfigError as err:
            errors = [str(issue) for issue in err.issues]
            for issue in err.issues:
                log.error("event=reload_rejected file=%s error=%r", self.config_path, str(issue))
        except transparent.TransparentError as err:  # the missing pieces, the fixes
            errors = [str(problem) for problem in err.problems]
            transparent.log_problems(err, "reload_rejected")
        except (OSError, ValueError) as err:  # a bind, the access log, a trust policy
            errors = [str(err)]
            log.error("event=reload_rejected file=%s error=%r", self.config_path, str(err))
        else:
            return []
        self.last_reload = {"time": time.time(), "ok": False, "errors": errors}
        self.reloads_refused += 1
        if not workers.is_worker():
            reload_status.write(os.getpid(), False, errors)
        self.access_log.reopen()  # a refused reload still follows a rotated log
        logs.reopen()
        for callback in self.on_reload_refused:
            callback(self, errors)
        return errors

    # -- stop --------------------------------------------------------------------------------

    async def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, let connections finish for up to ``timeout`` (``drain_timeout``)."""
        if self.stopping:
            return
        self.stopping = True
        if timeout is None:
            timeout = self.config.drain_timeout_s
        for listener in self.listeners.values():
            listener.stop_accepting()
        for callback in self.on_stop:
            try:
                callback(self)
            except Exception:
                log.exception("event=stop_hook_failed")
        if self.connections:
            log.info("event=draining connections=%d timeout=%gs", len(self.connections), timeout)
        deadline = self.loop.time() + timeout
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.connections:
            log.warning("event=drain_timeout closing=%d", len(self.connections))
            for conn in list(self.connections):
                conn.close(EndReason.SHUTDOWN)
            end = self.loop.time() + 2.0
            while self.connections and self.loop.time() < end:
                await asyncio.sleep(0.01)
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.routing is not None:  # the rules l4lb added, once no socket needs them
            self.routing.remove()
        self.access_log.close()


async def attach_parts(balancer: Balancer) -> None:
    """The parts that run beside the listeners, once they are up: health checks, the admin API
    (serving when the config has an ``[admin]`` table, following reloads), systemd's notify."""
    health.attach(balancer)
    if balancer.discovery is None:
        discovery.attach(balancer)
    await admin.attach(balancer)
    await monitor.attach(balancer)  # the listeners' monitor ports
    systemd.attach(balancer, reloads=not workers.is_worker())  # a worker's: the supervisor's
    workers.attach(balancer)  # in a worker: tells the supervisor of each applied reload


def settle_gc() -> None:
    """Put every object alive now out of the cyclic garbage collector's reach (``gc.freeze``).

    What start-up builds (modules, config, pools, listeners: about 30,000 objects) lives as long
    as the process, yet each full collection walked all of it: 12-89 ms on the bench machine,
    once in 6,000 to 30,000 connections, a stall that every connection in flight waits out (at
    1,000 new connections/s, the p99 of the 2 s round it falls in). Frozen, they are never
    scanned again;
    what comes later (connections) is collected as before. Run at start and after every reload:
    unfreezing first lets the full collection free what the reload made garbage, so a reload
    leaks nothing that was frozen.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _reopen_logs(balancer: Balancer) -> None:
    """SIGUSR2: reopen the access log, reconnect the event lines' syslog (if they use one)."""
    balancer.access_log.reopen()
    logs.reopen()


async def serve(
    config: Config,
    config_path: str | None = None,
    open_socket: OpenSocket = open_listening_socket,
) -> int:
    """Run one worker until SIGTERM/SIGINT; SIGHUP reloads the file. Returns the exit code."""
    loop = asyncio.get_running_loop()
    try:
        announcer = make_announcer(config)  # None without [anycast]
    except AnycastError as err:
        log.error("event=start_failed error=%r", str(err))
        return 1
    try:
        balancer = Balancer(config, config_path, loop, open_socket=open_socket, announcer=announcer)
    except OSError as err:
        where = err.filename or config.log.access
        log.error(
            "event=start_failed error=%r",
            f"log.access: cannot open {where}: {err.strerror} "
            "(expected a writable file path, 'stdout' or 'off')",
        )
        return 1
    found = discovery.Discovery(balancer)
    try:
        await found.prime()  # DNS backends resolved before the first connection
    except discovery.ResolveError as err:
        log.error("event=start_failed error=%r", str(err))
        balancer.access_log.close()
        return 1
    state_file.attach(balancer)  # drained/disabled backends stay so, before the first accept
    try:
        balancer.start()
    except BindError as err:
        log.error("event=bind_failed error=%r", err.strerror)
        balancer.access_log.close()
        return 3
    except transparent.TransparentError as err:  # say what to add, start nothing
        transparent.log_problems(err, "start_failed")
        if balancer.routing is not None:
            balancer.routing.remove()
        balancer.access_log.close()
        return 1
    # installed for the whole life: a repeated stop signal or a SIGHUP must never kill the drain
    signals = StopSignals(
        loop,
        lambda: workers.reload_by_signal(balancer),
        lambda: _close_all(balancer),
        reopen=lambda: _reopen_logs(balancer),
    )
    discovery.attach(balancer, found)
    try:
        await attach_parts(balancer)
    except Exception:
        log.exception("event=extension_failed")
    if announcer is not None:  # announce once serving
        try:
            await announcer.start(balancer)
        except (AnycastError, OSError) as err:
            log.error("event=start_failed error=%r", str(err))
            await announcer.close()
            await balancer.stop(timeout=0)
            return 1
    settle_gc()
    balancer.on_reload.append(lambda b: settle_gc())
    if workers.is_worker():  # worker=N is in the line; the supervisor says how many run
        log.info("event=started relay=%s", config.relay)
    else:
        log.info("event=started workers=1 relay=%s", config.relay)
    first = await signals.wait()
    balancer.draining = True
    now = signals.mode is StopMode.IMMEDIATE
    if announcer is not None and not now:  # withdraw first: new connections go to other nodes
        await announcer.drain()
    log.info(
        "event=stopping signal=%s drain_timeout=%gs",
        first.name,
        0 if now else balancer.config.drain_timeout_s,
    )
    await balancer.stop(0 if signals.mode is StopMode.IMMEDIATE else None)
    if announcer is not None:  # ExaBGP and the second-chance rules go last
        await announcer.close()
    log.info("event=stopped")
    return 0


def _close_all(balancer: Balancer) -> None:
    for conn in list(balancer.connections):
        conn.close(EndReason.SHUTDOWN)


def run(
    config: Config,
    config_path: str | None = None,
    open_socket: OpenSocket = open_listening_socket,
) -> int:
    """Run one worker in the foreground (with uvloop when installed); the exit code."""
    try:
        import uvloop
    except ImportError:  # a third-party dependency, installed on Linux only
        return asyncio.run(serve(config, config_path, open_socket))
    return uvloop.run(serve(config, config_path, open_socket))
