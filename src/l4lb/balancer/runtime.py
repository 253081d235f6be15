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

Extensions (health checks, admin API) plug in by module: each module named in
:data:`EXTENSIONS` that exists and defines ``attach(balancer)`` (a function or coroutine
function) is attached after the listeners are up.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from l4lb.balancer.admission import Rejected
from l4lb.balancer.connection import Connection
from l4lb.balancer.listener import BindError, Listener, open_listening_socket
from l4lb.balancer.pool import Pool
from l4lb.balancer.relay import get_relay
from l4lb.balancer.signals import StopMode, StopSignals
from l4lb.config.loader import ConfigError, load_config
from l4lb.config.schema import Config, ListenerConfig
from l4lb.config.values import format_hostport
from l4lb.observe.access_log import AccessLog

log = logging.getLogger("l4lb.balancer")

EXTENSIONS: tuple[str, ...] = (
    "l4lb.balancer.health",
    "l4lb.observe.admin",
    "l4lb.observe.systemd",
    "l4lb.balancer.workers",
)
"""Modules whose ``attach(balancer)`` is called once the listeners are up, if they define it."""

_PROXY_NAMES = ("off", "v1", "v2")


class Balancer:
    """Listeners and pools of one worker process; see the module docstring for readers."""

    def __init__(
        self,
        config: Config,
        config_path: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        self.config = config
        self.config_path = config_path
        self.start_relay = get_relay(config.relay)
        self.pools: dict[str, Pool] = {name: Pool(name, pc) for name, pc in config.pools.items()}
        self.listeners: dict[str, Listener] = {}
        self.connections: set[Connection] = set()
        self.access_log = AccessLog(config.log.access)
        self.started = time.time()
        self.reloads = 0
        self.last_reload: dict[str, Any] | None = None
        self.stopping = False
        self.on_reload: list[Callable[[Balancer], None]] = []
        self.on_stop: list[Callable[[Balancer], None]] = []
        self._sweeper: asyncio.TimerHandle | None = None

    # -- start -------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind every listener (all or none: :class:`BindError` leaves nothing bound), accept."""
        socks = self._bind([lc for lc in self.config.listeners])
        for lc in self.config.listeners:
            self._listen(lc, socks[lc.name])
        self._schedule_sweep()

    def _listen(self, lc: ListenerConfig, sock: socket.socket) -> None:
        """Start accepting on ``sock`` for the listener config ``lc``, and say so."""
        listener = Listener(self, lc, sock=sock)
        self.listeners[lc.name] = listener
        listener.start()
        log.info(
            "event=listening listener=%s bind=%s pool=%s",
            lc.name,
            format_hostport(*listener.address),
            lc.pool,
        )

    def _bind(self, configs: list[Any]) -> dict[str, Any]:
        socks: dict[str, Any] = {}
        try:
            for lc in configs:
                socks[lc.name] = open_listening_socket(*lc.bind_addr)
        except BindError:
            for sock in socks.values():
                sock.close()
            raise
        return socks

    # -- idle sweep --------------------------------------------------------------------------

    def _sweep_interval(self) -> float:
        shortest = min((p.idle_timeout for p in self.pools.values()), default=60.0)
        return min(5.0, max(0.05, shortest / 10))

    def _schedule_sweep(self) -> None:
        self._sweeper = self.loop.call_later(self._sweep_interval(), self._sweep)

    def _sweep(self) -> None:
        """Close relayed connections that moved no byte for their pool's idle_timeout.

        One pass over the connections instead of a timer per connection: each pass compares
        the byte counters with the previous pass, so the hot path only counts bytes.
        """
        now = self.loop.time()
        idle: list[Connection] = []
        for conn in self.connections:
            if conn.relay is None:
                continue
            moved = conn.bytes_from_client + conn.bytes_to_client
            if moved != conn.seen:
                conn.seen = moved
                conn.idle_since = now
            elif now - conn.idle_since >= conn.pool.idle_timeout:
                idle.append(conn)
        for conn in idle:
            conn.close("idle_timeout")
        if not self.stopping:
            self._schedule_sweep()

    # -- logs --------------------------------------------------------------------------------

    def log_connection(self, conn: Connection, reason: str, detail: str) -> None:
        """The access-log line of a connection that ended."""
        if not self.access_log.enabled:
            return
        admitted = conn.admitted
        upstream = admitted.upstream
        backend = conn.backend or (conn.tried[-1] if conn.tried else None)
        record: dict[str, Any] = {
            "event": "connection",
            "listener": conn.listener.name,
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
        """Apply a validated config; raises :class:`BindError` (nothing changed) if a bind fails.

        New listeners bind, removed ones stop accepting (their connections run on), changed
        pools apply to new connections; connections in flight keep their pool and backend.
        """
        fresh = []
        for lc in new.listeners:
            current = self.listeners.get(lc.name)
            if current is None or current.config.bind_addr != lc.bind_addr:
                fresh.append(lc)
        reopen = new.log != self.config.log or new.log.access not in ("off", "stdout")
        new_log = AccessLog(new.log.access) if reopen else None  # reopened: logrotate-friendly
        try:
            socks = self._bind(fresh)
        except BindError:
            if new_log is not None:
                new_log.close(wait=False)
            raise
        pools: dict[str, Pool] = {}
        for name, pc in new.pools.items():
            old = self.pools.get(name)
            pools[name] = old if old is not None and old.config == pc else Pool(name, pc, old)
        for name, old in self.pools.items():
            if name in pools and pools[name] is not old:
                # the new pool object inherits the backends; keep its hooks (health, admin)
                pools[name].on_change = old.on_change
                pools[name].on_connect_result = old.on_connect_result
        self.pools = pools
        if new.relay != self.config.relay:
            self.start_relay = get_relay(new.relay)
        names = {lc.name for lc in new.listeners}
        for name, listener in list(self.listeners.items()):
            if name not in names or name in socks:
                listener.stop_accepting()
                del self.listeners[name]
                log.info("event=listener_stopped listener=%s", name)
        for lc in new.listeners:
            if lc.name in socks:
                self._listen(lc, socks[lc.name])
            else:
                self.listeners[lc.name].reconfigure(lc)
        self.listeners = {lc.name: self.listeners[lc.name] for lc in new.listeners}
        if new_log is not None:
            old_log = self.access_log
            self.access_log = new_log
            old_log.close(wait=False)
        self.config = new
        self.reloads += 1
        self.last_reload = {"time": time.time(), "ok": True, "errors": []}
        log.info(
            "event=reloaded listeners=%s pools=%s",
            ",".join(self.listeners),
            ",".join(self.pools),
        )
        for callback in self.on_reload:
            callback(self)

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
        except (BindError, OSError) as err:
            errors = [str(err)]
            log.error("event=reload_rejected file=%s error=%r", self.config_path, str(err))
        else:
            return []
        self.last_reload = {"time": time.time(), "ok": False, "errors": errors}
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
                conn.close("shutdown")
            end = self.loop.time() + 2.0
            while self.connections and self.loop.time() < end:
                await asyncio.sleep(0.01)
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.access_log.close()

    @property
    def addresses(self) -> dict[str, tuple[str, int]]:
        """Listener name -> bound address."""
        return {name: listener.address for name, listener in self.listeners.items()}


async def _attach_extensions(balancer: Balancer) -> None:
    for name in EXTENSIONS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        attach = getattr(module, "attach", None)
        if attach is None:
            continue
        result = attach(balancer)
        if inspect.isawaitable(result):
            await result


async def serve(config: Config, config_path: str | None = None) -> int:
    """Run one worker until SIGTERM/SIGINT; SIGHUP reloads the file. Returns the exit code."""
    loop = asyncio.get_running_loop()
    try:
        balancer = Balancer(config, config_path, loop)
    except OSError as err:
        where = err.filename or config.log.access
        log.error(
            "event=start_failed error=%r",
            f"log.access: cannot open {where}: {err.strerror} "
            "(expected a writable file path, 'stdout' or 'off')",
        )
        return 1
    try:
        balancer.start()
    except BindError as err:
        log.error("event=bind_failed error=%r", err.strerror)
        balancer.access_log.close()
        return 3
    # installed for the whole life: a repeated stop signal or a SIGHUP must never kill the drain
    signals = StopSignals(loop, balancer.reload_file, lambda: _close_all(balancer))
    try:
        await _attach_extensions(balancer)
    except Exception:
        log.exception("event=extension_failed")
    log.info("event=started workers=1 relay=%s", config.relay)
    first = await signals.wait()
    now = signals.mode is StopMode.IMMEDIATE
    log.info(
        "event=stopping signal=%s drain_timeout=%gs",
        first.name,
        0 if now else balancer.config.drain_timeout_s,
    )
    await balancer.stop(0 if now else None)
    log.info("event=stopped")
    return 0


def _close_all(balancer: Balancer) -> None:
    for conn in list(balancer.connections):
        conn.close("shutdown")


def run(config: Config, config_path: str | None = None) -> int:
    """Run one worker in the foreground (with uvloop when installed); the exit code."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(config, config_path))
    return uvloop.run(serve(config, config_path))
