"""Several worker processes behind the same listeners (``workers = N``), and their supervisor.

The supervisor creates every listening socket itself before it forks: for each listener, one
``SO_REUSEPORT`` socket per worker, so the kernel spreads new connections across the workers
without a shared accept queue. It keeps its copies open, so a worker that crashes leaves its socket
(and the connections queued on it) in place for the worker that replaces it.

Consistency across workers:

- **Maglev** needs nothing: its lookup table is a pure function of the pool's backends, so every
  worker (and every l4lb instance with the same config) builds the same table and picks the same
  backend for a client.
- **Per-client limits** (``max_conns_per_client``, ``new_conns_per_client``) are counted in each
  worker's own memory. They are exact when the socket peer is the client: a classic BPF program
  attached to each listener's reuseport group (``SO_ATTACH_REUSEPORT_CBPF``) picks the socket from
  a hash of the source address (IPv4: the address; IPv6: its first ``min(client_v6_prefix, 64)``
  bits, so one limiter key never spans two workers), so a client always reaches the same worker.
  Because the supervisor holds every worker's socket, the group's order never changes, so the
  mapping holds across worker restarts. Behind ``accept_proxy`` the socket peer is an upstream
  proxy, not the client: steering on it would hand everything from one upstream to one worker, so
  those listeners get no program, the kernel's 4-tuple hash spreads connections, and the limits
  are per worker (a client may get up to ``workers`` times them; warned at start). Where the
  kernel refuses the program, the same holds (logged at start).
- **max_conns** is per worker, as nginx's ``worker_connections`` and HAProxy's per-process
  ``maxconn`` are: a listener takes up to ``workers × max_conns`` connections in all.

Signals: SIGTERM/SIGINT/SIGUSR1 stop every worker gracefully (each drains for ``drain_timeout``;
whatever is left after that and a grace period is killed); a repeated one is logged and ignored, as
the workers do (systemd and Ctrl-C signal the whole group); SIGQUIT is forwarded for an immediate
stop; SIGHUP is forwarded for a reload (ignored during a stop). A worker that dies on its own is
restarted, with a log line and a short back-off if it keeps dying.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from l4lb.balancer import logs, reload_status, signals
from l4lb.config.values import format_hostport
from l4lb.observe import systemd

__all__ = ["inherited_socket", "steering_program", "supervise"]

log = logging.getLogger("l4lb.workers")

Address = tuple[str, int]
RunWorker = Callable[[str, Any, int], int]

_INHERITED: dict[Address, socket.socket] = {}
"""In a worker: the listening sockets the supervisor made for it, by bind address."""
_CHANNEL: socket.socket | None = None
"""In a worker: where the supervisor sends the sockets of listeners a reload adds."""
_RECEIVED: set[Address] = set()
"""In a worker: the keys of ``_INHERITED`` that came over the channel (not from the fork)."""
_TALLY: reload_status.Tally | None = None
"""In a worker: the supervisor's count of reloads, for /metrics (each reload once)."""
_BALANCER: Any = None
"""In a worker: the balancer the tally is shown by (set by :func:`attach`)."""
_MAX_FDS = 64

SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGCHLD,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
"""Everything the supervisor waits for (blocked, then taken with ``sigtimedwait``)."""
GRACEFUL = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""Stop signals that drain (the same set as a worker's, see l4lb.balancer.signals)."""
_UNTIL_SERVING = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
"""Ignored in a new worker until its own handlers are installed (their default kills)."""
GRACE = 5.0
"""Seconds beyond ``drain_timeout`` before workers still running are killed."""
STARTUP = 2.0
"""A worker that exits with an error this soon after its first start failed to start (fatal)."""


def inherited_socket(bind: Address) -> socket.socket | None:
    """The listening socket the supervisor created for this worker on ``bind``, if any.

    The listener code asks this before creating a socket of its own, so a worker serves on the
    socket that keeps its place in the reuseport group. Sockets of listeners added by a reload
    arrive over the supervisor's channel (``SCM_RIGHTS``) before its SIGHUP, and are taken here.
    """
    _receive()
    return _INHERITED.pop(_key(bind), None)


def _receive() -> None:
    """Take what the supervisor sent: a round marker, then one message per added listener.

    A new round closes what an earlier one sent and no reload used (its config was replaced
    before this worker read it), so no stray copy keeps a removed port listening.
    """
    if _CHANNEL is None:
        return
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(_CHANNEL, 4096, _MAX_FDS)
        except OSError:  # BlockingIOError: nothing (more) sent
            return
        if not data:
            return
        if data.startswith(b"tally "):
            _take_tally(data[6:])
            continue
        if data == b"round":  # an earlier round's leftovers; never the sockets of the fork
            for key in _RECEIVED:
                stale = _INHERITED.pop(key, None)
                if stale is not None:
                    stale.close()
            _RECEIVED.clear()
            continue
        host, _, port = data.decode("ascii", "replace").rpartition(" ")
        for fd in fds:
            sock = socket.socket(fileno=fd)
            if not port.isdigit():
                sock.close()
                continue
            old = _INHERITED.pop(_key((host, int(port))), None)
            if old is not None:
                old.close()
            _INHERITED[_key((host, int(port)))] = sock
            _RECEIVED.add(_key((host, int(port))))


def _take_tally(data: bytes) -> None:
    global _TALLY
    try:
        _TALLY = reload_status.Tally.decode(data)
    except ValueError as err:
        log.warning("event=reload_tally_bad error=%r", str(err))
        return
    _show_tally()


def _show_tally() -> None:
    """The worker's reload counters are the supervisor's (its own count until one arrives)."""
    if _BALANCER is not None and _TALLY is not None:
        _BALANCER.reloads = _TALLY.applied
        _BALANCER.reloads_refused = _TALLY.refused
        _BALANCER.last_reload = _TALLY.last


def _key(bind: Address) -> Address:
    host, port = bind
    return (host.strip("[]"), int(port))


# -- the steering program -------------------------------------------------------------------

SO_ATTACH_REUSEPORT_CBPF = 51
_SKF_NET_OFF = -0x100000
_LD_W_ABS, _LD_B_ABS = 0x20, 0x30
_TAX, _RET_A, _JA = 0x07, 0x16, 0x05
_JEQ_K = 0x15
_AND_K, _RSH_K, _MUL_K, _MOD_K, _XOR_X = 0x54, 0x74, 0x24, 0x94, 0xAC

Insn = tuple[int, int, int, int]


def steering_program(workers: int, v6_prefix: int = 64) -> list[Insn]:
    """Classic BPF that returns ``hash(client) % workers`` for a reuseport group.

    IPv4: the whole source address. IPv6: the first ``min(v6_prefix, 64)`` bits of it, so
    addresses that share a limiter key (a /prefix) share a worker. Loads are relative to the
    network header (``SKF_NET_OFF``): the program runs on the SYN.
    """
    bits = min(max(v6_prefix, 0), 64)
    hi = (0xFFFFFFFF << (32 - min(bits, 32))) & 0xFFFFFFFF if bits else 0
    lo = (0xFFFFFFFF << (64 - bits)) & 0xFFFFFFFF if bits > 32 else 0
    net = _SKF_NET_OFF & 0xFFFFFFFF
    mix = [
        (_TAX, 0, 0, 0),
        (_RSH_K, 0, 0, 16),
        (_XOR_X, 0, 0, 0),
        (_MUL_K, 0, 0, 0x045D9F3B),
        (_TAX, 0, 0, 0),
        (_RSH_K, 0, 0, 16),
        (_XOR_X, 0, 0, 0),
        (_MOD_K, 0, 0, workers),
        (_RET_A, 0, 0, 0),
    ]
    v6 = [
        (_LD_W_ABS, 0, 0, net + 8),
        (_AND_K, 0, 0, hi),
        (_TAX, 0, 0, 0),
        (_LD_W_ABS, 0, 0, net + 12),
        (_AND_K, 0, 0, lo),
        (_XOR_X, 0, 0, 0),
    ]
    v4 = [(_LD_W_ABS, 0, 0, net + 12), (_JA, 0, 0, len(v6))]
    head = [
        (_LD_B_ABS, 0, 0, net),
        (_RSH_K, 0, 0, 4),
        (_JEQ_K, len(v4), 0, 6),  # version 6: skip the IPv4 load
    ]
    return head + v4 + v6 + mix


def attach_steering(sock: socket.socket, program: Sequence[Insn]) -> None:
    """Attach ``program`` to the reuseport group of listening socket ``sock``."""
    code = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buf = ctypes.create_string_buffer(code)
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("HL", len(program), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


# -- listening sockets ----------------------------------------------------------------------


def open_listeners(config: Any, workers: int) -> list[dict[Address, socket.socket]]:
    """For each worker, its own SO_REUSEPORT socket on every listener (raises OSError)."""
    return open_groups(config.listeners, workers)


def open_groups(listeners: Sequence[Any], workers: int) -> list[dict[Address, socket.socket]]:
    """For each worker, its own SO_REUSEPORT socket on each of ``listeners`` (raises OSError)."""
    per_worker: list[dict[Address, socket.socket]] = [{} for _ in range(workers)]
    try:
        for listener in listeners:
            host, port = listener.bind_addr
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            group = []
            for i in range(workers):
                s = socket.socket(family, socket.SOCK_STREAM)
                per_worker[i][_key((host, port))] = s
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                try:
                    s.bind((host, port))
                except OSError as err:
                    raise OSError(
                        err.errno, f"listener {listener.name}: cannot bind {listener.bind}: {err}"
                    ) from err
                s.listen(4096)
                s.setblocking(False)
                group.append(s)
            if getattr(listener, "accept_proxy", "off") != "off":
                # the socket peer is an upstream proxy, not the client: steering on it would send
                # everything from one upstream to one worker; the kernel's 4-tuple hash spreads
                log.info(
                    "event=steering_off listener=%s reason=accept_proxy detail=%r",
                    listener.name,
                    "connections spread by the kernel's hash: the socket peer is a proxy",
                )
                continue
            try:
                attach_steering(group[0], steering_program(workers, listener.client_v6_prefix))
            except OSError as err:
                log.warning(
                    "event=steering_unavailable listener=%s error=%r per_client_limits=per_worker",
                    listener.name,
                    str(err),
                )
    except BaseException:
        for socks in per_worker:
            for s in socks.values():
                s.close()
        raise
    return per_worker


def warn_per_worker_limits(config: Any) -> None:
    """Say where per-client limits are counted per worker (a client may get workers × them)."""
    for lc in config.listeners:
        limited = (
            getattr(lc, "max_conns_per_client", None) is not None
            or getattr(lc, "new_conns_per_client", None) is not None
        )
        if limited and getattr(lc, "accept_proxy", "off") != "off":
            log.warning(
                "event=per_client_limits_per_worker listener=%s workers=%d detail=%r",
                lc.name,
                config.workers,
                "behind accept_proxy the socket peer is the upstream, not the client, so "
                "connections are not steered by client: each worker counts its own, and a "
                "client may get up to workers x max_conns_per_client / new_conns_per_client",
            )


# -- the supervisor -------------------------------------------------------------------------


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _stop_with_parent(parent: int) -> None:
    """Have the kernel send this worker SIGTERM (a graceful drain) if the supervisor dies.

    Without it a supervisor killed with SIGKILL would leave its workers serving the port
    forever, out of anyone's control.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the supervisor's own cleanup still applies
        return
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _default_run_worker(config_path: str, config: Any, index: int) -> int:
    """Run the single-worker balancer in this (forked) process, on the inherited sockets."""
    from l4lb.balancer import listener, runtime

    def open_inherited(host: str, port: int) -> socket.socket:
        sock = inherited_socket((host, port))
        return sock if sock is not None else listener.open_listening_socket(host, port)

    # the runtime binds through the factory it is given: ours serves the inherited sockets first
    return int(runtime.run(config, config_path, open_socket=open_inherited))


@dataclass(slots=True)
class _Worker:
    index: int
    channel: socket.socket | None = None
    """The supervisor's end of the socket pair the worker receives added listeners on."""
    pid: int = 0
    started: float = 0.0
    starts: int = 0
    restart_at: float | None = None
    backoff: float = 0.0


class Supervisor:
    """Forks, watches and stops the workers; see the module docstring."""

    def __init__(
        self,
        config_path: str,
        config: Any,
        run_worker: RunWorker = _default_run_worker,
        load: Callable[[str], Any] | None = None,
    ) -> None:
        self.config_path = config_path
        self.config = config
        self.run_worker = run_worker
        self.load = load
        """Reads the config file again on SIGHUP (None: keep the first config)."""
        self.count = int(config.workers)
        self.drain = float(getattr(config, "drain_timeout_s", 30.0))
        self.workers = [_Worker(i) for i in range(self.count)]
        self.sockets: list[dict[Address, socket.socket]] = []
        self.stopping = False
        self.status = 0
        self.worker_owned: set[Address] = set()
        self.serving: set[int] = set()
        """Workers that said they serve (the supervisor logs ``workers_started`` once)."""
        self.announced = False
        self.tally = reload_status.Tally()
        """Every reload counted once (sent to each worker for /metrics)."""
        self.rounds = reload_status.Rounds()
        """Signalled reloads waiting for the workers' outcomes."""

    def run(self) -> int:
        try:
            self.sockets = open_listeners(self.config, self.count)
        except OSError as err:
            log.error("event=start_failed error=%r", err.strerror or str(err))
            return 1
        warn_per_worker_limits(self.config)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            log.info(
                "event=workers_start workers=%d pid=%d listeners=%s",
                self.count,
                os.getpid(),
                ",".join(lst.bind for lst in self.config.listeners),
            )
            for w in self.workers:
                self._spawn(w, old_mask)
            return self._loop(old_mask)
        finally:
            self._close_sockets()
            for w in self.workers:  # never leave a worker behind, whatever happened
                if w.channel is not None:
                    w.channel.close()
                    w.channel = None
                if w.pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(w.pid, signal.SIGKILL)
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(w.pid, 0)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _spawn(self, w: _Worker, old_mask: set[int | signal.Signals]) -> None:
        _flush_all()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                global _CHANNEL
                _stop_with_parent(parent)
                logs.set_worker(w.index)
                ours.close()
                for other in self.workers:
                    if other.channel is not None:
                        other.channel.close()
                theirs.setblocking(False)
                _CHANNEL = theirs
                for sig in SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                # a reload forwarded before the worker has its own handlers must not kill it
                # (SIGHUP's default action) nor be lost: the config may be newer than the one
                # this worker starts on. Remembered, and replayed once the handlers are in.

                for sig in _UNTIL_SERVING:
                    signal.signal(sig, signals.remember)
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                for i, socks in enumerate(self.sockets):
                    for addr, s in socks.items():
                        if i == w.index:
                            _INHERITED[addr] = s
                        else:
                            s.close()
                code = self.run_worker(self.config_path, self.config, w.index)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.exception("event=worker_failed index=%d", w.index)
            finally:
                _flush_all()  # a closed stdout (EPIPE) must not let the child run on
                os._exit(code)
        theirs.close()
        if w.channel is not None:
            w.channel.close()
        ours.setblocking(False)  # a worker that does not read must never block us
        w.channel = ours
        w.pid = pid
        w.started = time.monotonic()

        w.starts += 1
        w.restart_at = None
        log.info("event=worker_started index=%d pid=%d", w.index, pid)
        if self.tally != reload_status.Tally():  # a restarted worker shows the true count
            with contextlib.suppress(OSError):
                ours.send(b"tally " + self.tally.encode())

    def _loop(self, old_mask: set[int | signal.Signals]) -> int:
        deadline: float | None = None
        while True:
            now = time.monotonic()
            if self.stopping and not any(w.pid for w in self.workers):
                log.info("event=workers_stopped workers=%d status=%d", self.count, self.status)
                return self.status
            if deadline is not None and now >= deadline:
                for w in self.workers:
                    if w.pid:
                        log.warning(
                            "event=worker_killed index=%d pid=%d after=%.0fs",
                            w.index,
                            w.pid,
                            self.drain + GRACE,
                        )
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(w.pid, signal.SIGKILL)
                deadline = now + GRACE  # reaped below; don't repeat the kill every loop
                self.status = 1
            for w in self.workers:
                if w.restart_at is not None and now >= w.restart_at and not self.stopping:
                    self._spawn(w, old_mask)
            waits = [1.0]
            waits += [w.restart_at - now for w in self.workers if w.restart_at is not None]
            if deadline is not None:
                waits.append(deadline - now)
            if (round_end := self.rounds.next_deadline()) is not None:
                waits.append(round_end - now)
            info = signal.sigtimedwait(SIGNALS, max(0.01, min(waits)))
            self._follow_workers()  # before a SIGHUP: what they applied comes first
            for outcome in self.rounds.settle(time.monotonic()):
                self._record(outcome)
            if info is not None:
                sig = info.si_signo
                if sig in GRACEFUL and not self.stopping:
                    deadline = time.monotonic() + self.drain + GRACE
                    self._stop(sig)
                elif sig in GRACEFUL:  # systemd, a terminal, an impatient operator: not an order
                    log.info(
                        "event=stop_signal_repeated signal=%s detail=%r",
                        signal.Signals(sig).name,
                        "the workers drain on (bounded by drain_timeout); SIGQUIT stops them now",
                    )
                elif sig == signal.SIGQUIT:
                    log.warning("event=stop_now signal=SIGQUIT workers=%d", self.count)
                    if not self.stopping:
                        self._stop(sig)
                    self._forward(signal.SIGQUIT)
                    soon = time.monotonic() + GRACE
                    deadline = soon if deadline is None else min(deadline, soon)
                elif sig == signal.SIGHUP and self.stopping:
                    log.info("event=reload_ignored signal=SIGHUP reason=stopping")
                elif sig == signal.SIGHUP:
                    self._reload()
                elif sig == signal.SIGUSR2:  # the workers write the access log
                    logs.reopen()  # the supervisor's own event lines, if sent to syslog
                    self._forward(signal.SIGUSR2)
            self._reap()

    def _reload(self) -> None:
        """Re-read the file, bring the listening sockets in line with it, then tell the workers.

        The supervisor holds a copy of every listening socket (so a crashed worker's queue
        survives); a listener the reload removes must lose that copy too, or its port would
        stay open with nobody accepting. A listener it adds gets a socket group like the
        first ones (one socket per worker, steering attached), sent to each running worker
        before its SIGHUP; a worker started later inherits it. A new config that cannot bind
        is refused here, before any worker sees it.
        """
        if self.load is not None:
            try:
                new = self.load(self.config_path)
            except Exception as err:  # the workers refuse it as well and keep the old config
                log.warning("event=supervisor_reload_rejected error=%r", str(err).splitlines()[0])
            else:
                try:
                    self._sync_listeners(self.config, new)
                except OSError as err:
                    log.error(
                        "event=reload_rejected error=%r detail=%r",
                        err.strerror or str(err),
                        "the workers keep the running config",
                    )
                    self._record(reload_status.Outcome(False, (err.strerror or str(err),)))
                    self._forward(signal.SIGUSR2)  # a refused reload still reopens the logs
                    return
                self.config = new
                self.drain = float(getattr(new, "drain_timeout_s", self.drain))
                logs.events_to(new.log.events, new.log.facility, new.log.tag)
        self.rounds.open({w.index for w in self.workers if w.pid}, time.monotonic())
        self._forward(signal.SIGHUP)
        log.info("event=reload_forwarded workers=%d", self.count)

    def _record(self, outcome: reload_status.Outcome) -> None:
        """One reload's outcome, once: counted, sent to every worker (/metrics), written for
        ``l4lb reload`` (after the workers have the count) and told to systemd."""
        self.tally = self.tally.add(outcome.applied, outcome.errors)
        message = b"tally " + self.tally.encode()
        for w in self.workers:
            if w.pid and w.channel is not None:
                with contextlib.suppress(OSError):
                    w.channel.send(message)
        reload_status.write(os.getpid(), outcome.applied, outcome.errors, outcome.summary)
        serving = ", ".join(lc.name for lc in self.config.listeners)
        count = self.tally.applied if outcome.applied else self.tally.refused
        systemd.reload_outcome(outcome.applied, count, serving, outcome.errors)
        log.info(
            "event=reload_counted result=%s applied=%d refused=%d",
            "applied" if outcome.applied else "refused",
            self.tally.applied,
            self.tally.refused,
        )

    def _sync_listeners(self, old: Any, new: Any) -> None:
        """Open the groups of added binds, close those of removed ones, send workers theirs."""
        held = set(self.sockets[0]) if self.sockets else set()
        wanted = {_key(lc.bind_addr): lc for lc in new.listeners}
        mine = [lc for k, lc in wanted.items() if k not in held and k not in self.worker_owned]
        opened = open_groups(mine, self.count)
        self.worker_owned &= set(wanted)
        for key in held - set(wanted):
            for socks in self.sockets:
                socks.pop(key).close()
            log.info("event=listener_closed bind=%s", format_hostport(*key))
        for socks, more in zip(self.sockets, opened, strict=True):
            socks.update(more)
        # a worker binds afresh every listener whose name is new or whose bind changed
        before = {(lc.name, _key(lc.bind_addr)) for lc in old.listeners}
        fresh = [k for k, lc in wanted.items() if (lc.name, k) not in before]
        fresh = [k for k in fresh if k not in self.worker_owned]
        for w in self.workers:
            if w.pid and w.channel is not None:
                self._send(w, fresh)

    def _send(self, w: _Worker, binds: list[Address]) -> None:
        assert w.channel is not None
        if not binds:
            return
        try:
            w.channel.send(b"round")
            for key in binds:
                sock = self.sockets[w.index][key]
                message = f"{key[0]} {key[1]}".encode()
                socket.send_fds(w.channel, [message], [sock.fileno()])
        except OSError as err:  # a worker that died meanwhile: its replacement inherits them
            log.warning("event=listener_send_failed index=%d error=%r", w.index, str(err))

    def _stop(self, sig: int) -> None:
        self.stopping = True
        log.info(
            "event=stopping signal=%s workers=%d drain_timeout=%.0fs",
            signal.Signals(sig).name,
            self.count,
            self.drain,
        )
        # our copies first: once every worker has closed its own, the kernel stops queueing
        self._close_sockets()
        self._forward(signal.SIGTERM)

    def _forward(self, sig: int) -> None:
        for w in self.workers:
            if w.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, sig)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = next((w for w in self.workers if w.pid == pid), None)
            if w is None:
                continue
            w.pid = 0
            self.rounds.gone(w.index)
            lived = time.monotonic() - w.started
            how = _describe(status)
            if self.stopping:
                log.info("event=worker_stopped index=%d pid=%d %s", w.index, pid, how)
                stopped_by_signal = os.WIFSIGNALED(status) and os.WTERMSIG(status) in (
                    *GRACEFUL,
                    signal.SIGQUIT,
                )  # still starting when asked to stop: nothing to drain
                if os.waitstatus_to_exitcode(status) != 0 and not stopped_by_signal:
                    self.status = 1
                continue
            code = os.waitstatus_to_exitcode(status)
            if code > 0 and w.starts == 1 and lived < STARTUP:
                log.error(
                    "event=worker_start_failed index=%d pid=%d %s: stopping all workers",
                    w.index,
                    pid,
                    how,
                )
                self.status = code
                self._stop(signal.SIGTERM)
                continue
            w.backoff = 0.0 if lived > 10 else min(5.0, max(0.1, w.backoff * 2))
            w.restart_at = time.monotonic() + w.backoff
            log.warning(
                "event=worker_crashed index=%d pid=%d %s after=%.1fs restart_in=%.1fs",
                w.index,
                pid,
                how,
                lived,
                w.backoff,
            )

    def _follow_workers(self) -> None:
        """A worker applied a reload of its own (``POST /reload``): follow the file.

        The supervisor did not open what that reload added (the workers bound those
        themselves), but it must let go of what it removed, or the port stays open.
        """
        told = False
        for w in self.workers:
            while w.channel is not None:
                try:
                    message = w.channel.recv(65536)
                except OSError:  # BlockingIOError: nothing (more)
                    break
                told |= message == b"reloaded"
                if message.startswith((b"signal-outcome ", b"api-outcome ")):
                    self._outcome(w, message)
                if message == b"serving":
                    self.serving.add(w.index)
        if not self.announced and len(self.serving) == self.count:
            self.announced = True  # once, with the true count (a restarted worker: its own line)
            log.info(
                "event=workers_started workers=%d pid=%d relay=%s",
                self.count,
                os.getpid(),
                self.config.relay,
            )
        if not told or self.stopping or self.load is None:
            return
        try:
            new = self.load(self.config_path)
        except Exception:  # the worker applied it a moment ago; changed since: next time
            return
        held = set(self.sockets[0]) if self.sockets else set()
        wanted = {_key(lc.bind_addr) for lc in new.listeners}
        for key in held - wanted:
            for socks in self.sockets:
                socks.pop(key).close()
            log.info("event=listener_closed bind=%s", format_hostport(*key))
        self.worker_owned = wanted - held
        self.config = new
        self.drain = float(getattr(new, "drain_timeout_s", self.drain))

    def _outcome(self, w: _Worker, message: bytes) -> None:
        kind, _, data = message.partition(b" ")
        try:
            outcome = reload_status.Outcome.decode(data)
        except ValueError as err:
            log.warning("event=reload_outcome_bad index=%d error=%r", w.index, str(err))
            return
        if kind == b"api-outcome":  # one reload (POST /reload), already run in every worker
            self._record(outcome)
        else:
            self.rounds.outcome(w.index, outcome)

    def _close_sockets(self) -> None:
        for socks in self.sockets:
            for s in socks.values():
                s.close()
        self.sockets = []


def _flush_all() -> None:
    """Flush the log queue and Python's stdout/stderr buffers, whatever state they are in."""
    logs.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal={signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit={os.waitstatus_to_exitcode(status)}"


def supervise(config_path: str | Path, config: Any) -> int:
    """Run ``config.workers`` worker processes until SIGTERM/SIGINT; the exit status."""
    from l4lb.config.loader import load_config

    return Supervisor(str(config_path), config, load=load_config).run()


def attach(balancer: Any) -> None:
    """Runtime extension hook: in a worker, tell the supervisor after every applied reload.

    A reload through the admin API (``POST /reload``) happens in the workers alone; told, the
    supervisor follows the file and closes its copies of the listeners that reload removed.
    """
    global _BALANCER
    if _CHANNEL is not None:
        _BALANCER = balancer
        _show_tally()
        balancer.on_reload.append(_tell_reloaded)
        balancer.loop.add_reader(_CHANNEL.fileno(), _receive)  # the tally after each reload
        _receive()
        with contextlib.suppress(OSError):
            _CHANNEL.send(b"serving")


def is_worker() -> bool:
    """True in a worker process forked by the supervisor."""
    return _CHANNEL is not None


def reload_by_signal(balancer: Any) -> list[str]:
    """SIGHUP's reload: the file again; in a worker, its outcome goes to the supervisor."""
    errors: list[str] = balancer.reload_file()
    summary = f"listeners={','.join(balancer.listeners)} pools={','.join(balancer.pools)}"
    report(reload_status.Outcome(not errors, tuple(errors), summary), signalled=True)
    return errors


def report(outcome: reload_status.Outcome, signalled: bool) -> None:
    """In a worker, tell the supervisor how a reload ended: one of a SIGHUP's (``signalled``,
    paired with the other workers' by :class:`~l4lb.balancer.reload_status.Rounds`), or a
    reload through the admin API, already run in every worker. Elsewhere nothing."""
    if _CHANNEL is None:
        return
    kind = b"signal-outcome " if signalled else b"api-outcome "
    try:
        _CHANNEL.send(kind + outcome.encode())
    except OSError as err:
        log.warning("event=reload_outcome_unsent error=%r", str(err))
        return
    # wakes the supervisor's sigtimedwait at once (it reaps nothing and reads the channel)
    with contextlib.suppress(ProcessLookupError):
        os.kill(os.getppid(), signal.SIGCHLD)


def _tell_reloaded(balancer: Any) -> None:
    if _CHANNEL is not None:
        with contextlib.suppress(OSError):
            _CHANNEL.send(b"reloaded")
