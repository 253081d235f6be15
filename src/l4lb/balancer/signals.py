"""What one worker does with each signal, for its whole life (installed once, never removed).

- SIGTERM, SIGINT (and SIGUSR1, HAProxy's soft-stop): the first one starts the graceful stop
  (stop accepting, drain for ``drain_timeout``). Repeats change nothing but a log line: systemd
  sends SIGTERM to the whole control group and the supervisor forwards its own, a terminal's
  Ctrl-C reaches every process of the group, so a second stop signal is routine, not an order.
- SIGQUIT: stop now, drained or not: every connection still open is closed (access-log
  ``end = shutdown``) and the process exits 0. This is the operator's "force" (Ctrl-\\ in a
  terminal, ``systemctl kill -s QUIT``); SIGKILL remains the last resort.
- SIGHUP: reload the config file; during a stop it is ignored with a log line (logrotate or
  config management may send it at any time: it must never kill a draining process).
- SIGUSR2: reopen the access log (after logrotate moved it) and nothing else. nginx uses
  SIGUSR1 for this, but here SIGUSR1 is a graceful stop (HAProxy's soft-stop), so the free
  user signal reopens. A SIGHUP reopens the log too, whether its reload is applied or refused.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import signal
from collections.abc import Callable

log = logging.getLogger("l4lb.balancer")

GRACEFUL = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""Signals that start the graceful stop."""
IMMEDIATE = signal.SIGQUIT
"""The signal that closes every connection and exits without waiting for the drain."""
REOPEN = signal.SIGUSR2
"""The signal that reopens the access log and does nothing else."""
IGNORED: tuple[signal.Signals, ...] = ()
"""Signals whose default action would kill the process, and which mean nothing to l4lb."""


_PENDING: list[int] = []
"""Signals that arrived before the handlers were installed (see :func:`remember`)."""


def remember(signum: int, frame: object = None) -> None:
    """A ``signal.signal`` handler for a worker still starting: keep the signal for later.

    A SIGHUP forwarded while a new worker is still importing and binding must neither kill it
    (the default action) nor be lost (it may carry a config newer than the one the worker
    starts on): :class:`StopSignals` replays it once the real handlers are installed.
    """
    if signum not in _PENDING:
        _PENDING.append(signum)


class StopMode(enum.Enum):
    RUNNING = "running"
    DRAINING = "draining"
    IMMEDIATE = "immediate"


class StopSignals:
    """Installs the handlers on ``loop``; ``wait()`` returns once a stop signal arrived.

    ``reload`` runs on SIGHUP while running; ``close_all`` on SIGQUIT (at once, or as soon as the
    stop begins).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        reload: Callable[[], object],
        close_all: Callable[[], None],
        reopen: Callable[[], None] = lambda: None,
    ) -> None:
        self.loop = loop
        self.reload = reload
        self.close_all = close_all
        self.reopen = reopen
        self.mode = StopMode.RUNNING
        self.first: signal.Signals | None = None
        self._stop = asyncio.Event()
        for sig in GRACEFUL:
            loop.add_signal_handler(sig, self._graceful, sig)
        loop.add_signal_handler(IMMEDIATE, self._immediate)
        loop.add_signal_handler(signal.SIGHUP, self._hangup)
        loop.add_signal_handler(REOPEN, self._reopen)
        for sig in IGNORED:
            loop.add_signal_handler(sig, self._ignored, sig)
        while _PENDING:
            sig = signal.Signals(_PENDING.pop(0))
            log.info("event=signal_replayed signal=%s detail='arrived while starting'", sig.name)
            loop.call_soon(self._dispatch, sig)

    def _dispatch(self, sig: signal.Signals) -> None:
        if sig == signal.SIGHUP:
            self._hangup()
        elif sig == IMMEDIATE:
            self._immediate()
        elif sig in GRACEFUL:
            self._graceful(sig)
        elif sig == REOPEN:
            self._reopen()
        else:
            self._ignored(sig)

    async def wait(self) -> signal.Signals:
        """Until the first stop signal; which one it was."""
        await self._stop.wait()
        assert self.first is not None
        return self.first

    def _graceful(self, sig: signal.Signals) -> None:
        if self.mode is StopMode.RUNNING:
            self.mode = StopMode.DRAINING
            self.first = sig
            self._stop.set()
            return
        log.info(
            "event=stop_signal_repeated signal=%s mode=%s detail=%r",
            sig.name,
            self.mode.value,
            "the drain goes on (bounded by drain_timeout); SIGQUIT closes every connection now",
        )

    def _immediate(self) -> None:
        log.warning(
            "event=stop_now signal=SIGQUIT detail=%r", "closing every connection without draining"
        )
        if self.first is None:
            self.first = IMMEDIATE
        self.mode = StopMode.IMMEDIATE
        self._stop.set()
        self.close_all()

    def _hangup(self) -> None:
        if self.mode is StopMode.RUNNING:
            self.reload()
            return
        log.info("event=reload_ignored signal=SIGHUP reason=stopping mode=%s", self.mode.value)

    def _reopen(self) -> None:
        log.info("event=reopen_logs signal=%s", REOPEN.name)
        self.reopen()

    def _ignored(self, sig: signal.Signals) -> None:
        log.info("event=signal_ignored signal=%s", sig.name)
