"""The outcome of the last reload, written to a small file for ``l4lb reload`` to read.

A signal carries no answer: ``kill -HUP`` succeeds whether the new config is applied or
refused. So the process that handled the reload writes ``reload-status.json`` in its runtime
directory (``$L4LB_RUNTIME_DIR``, else systemd's ``$RUNTIME_DIRECTORY`` from the unit's
``RuntimeDirectory=``): the pid the signal went to (the supervisor's with several workers),
the time, ``event=reloaded`` or ``event=reload_rejected`` and the errors. The file is replaced
atomically (written aside, then renamed), so a reader never sees half of it. Without a runtime
directory nothing is written; a failure to write is logged, never raised.

With ``workers > 1`` the supervisor alone writes it, and counts the reloads (:class:`Tally`):
each worker tells it its outcome (:class:`Outcome`) and :class:`Rounds` makes one outcome of a
signalled reload's; a reload through the admin API arrives as one outcome from the worker that
ran it for all. So ``l4lb_reloads_total`` counts each reload once, whichever worker answers.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("l4lb.balancer")

FILE = "reload-status.json"


@dataclass(frozen=True, slots=True)
class ReloadStatus:
    pid: int
    time: float
    applied: bool
    errors: tuple[str, ...] = ()
    summary: str = ""

    @property
    def event(self) -> str:
        return "reloaded" if self.applied else "reload_rejected"


def directory(environ: Mapping[str, str] | None = None) -> Path | None:
    """Where the status file lives, or None (then nobody writes or reads it)."""
    env = os.environ if environ is None else environ
    chosen = env.get("L4LB_RUNTIME_DIR") or env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return Path(chosen) if chosen else None


def write(
    pid: int,
    applied: bool,
    errors: Sequence[str] = (),
    summary: str = "",
    where: Path | None = None,
) -> ReloadStatus:
    """Record one reload's outcome for the process ``pid`` (what ``l4lb reload`` signalled)."""
    status = ReloadStatus(pid, time.time(), applied, tuple(errors), summary)
    folder = where if where is not None else directory()
    if folder is None:
        return status
    doc = {
        "pid": status.pid,
        "time": status.time,
        "event": status.event,
        "applied": status.applied,
        "errors": list(status.errors),
        "summary": status.summary,
    }
    target = folder / FILE
    aside = folder / f".{FILE}.{os.getpid()}"
    try:
        aside.write_text(json.dumps(doc) + "\n")
        os.replace(aside, target)
    except OSError as err:
        log.warning("event=reload_status_failed file=%s error=%r", target, err.strerror or str(err))
    return status


def read(folder: Path) -> ReloadStatus | None:
    """The last outcome recorded in ``folder``, or None (no file yet, or not one of ours)."""
    try:
        doc = json.loads((folder / FILE).read_text())
        return ReloadStatus(
            pid=int(doc["pid"]),
            time=float(doc["time"]),
            applied=bool(doc["applied"]),
            errors=tuple(str(e) for e in doc.get("errors", ())),
            summary=str(doc.get("summary", "")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -- several workers: one count per reload ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tally:
    """Reloads counted once each, however many workers applied them (the supervisor's count,
    which it sends every worker for ``/metrics``: ``l4lb_reloads_total{result}``)."""

    applied: int = 0
    refused: int = 0
    last: dict[str, Any] | None = None
    """``{"time", "ok", "errors"}`` of the last reload (``last_reload`` in /status)."""

    def add(self, applied: bool, errors: Sequence[str] = ()) -> Tally:
        last = {"time": time.time(), "ok": applied, "errors": list(errors)}
        if applied:
            return Tally(self.applied + 1, self.refused, last)
        return Tally(self.applied, self.refused + 1, last)

    def encode(self) -> bytes:
        last = self.last
        if last is not None:  # one datagram: a bounded list of bounded errors
            last = {**last, "errors": _bounded(last.get("errors", ()))}
        return json.dumps({"applied": self.applied, "refused": self.refused, "last": last}).encode()

    @classmethod
    def decode(cls, data: bytes) -> Tally:
        """The inverse of :meth:`encode`; ValueError when ``data`` is not one."""
        try:
            doc = json.loads(data)
            return cls(int(doc["applied"]), int(doc["refused"]), doc.get("last"))
        except (KeyError, TypeError, UnicodeDecodeError) as err:
            raise ValueError(f"not a reload tally: {err}") from None


def _bounded(errors: Sequence[str]) -> list[str]:
    """At most 20 errors of at most 1000 characters: a worker datagram stays small."""
    return [str(e)[:1000] for e in list(errors)[:20]]


@dataclass(frozen=True, slots=True)
class Outcome:
    """One worker's reload result, as it tells the supervisor."""

    applied: bool
    errors: tuple[str, ...] = ()
    summary: str = ""

    def encode(self) -> bytes:
        doc = {"applied": self.applied, "errors": _bounded(self.errors), "summary": self.summary}
        return json.dumps(doc).encode()

    @classmethod
    def decode(cls, data: bytes) -> Outcome:
        try:
            doc = json.loads(data)
            return cls(
                bool(doc["applied"]), tuple(str(e) for e in doc["errors"]), str(doc["summary"])
            )
        except (KeyError, TypeError, UnicodeDecodeError) as err:
            raise ValueError(f"not a reload outcome: {err}") from None


@dataclass(slots=True)
class _Round:
    expected: set[int]
    deadline: float
    outcomes: dict[int, Outcome] = field(default_factory=dict)


class Rounds:
    """Pairs the outcomes of one signalled reload (SIGHUP forwarded to every worker) into one.

    :meth:`open` when the supervisor forwards a SIGHUP, with the workers it signalled; each
    worker's next outcome goes to the oldest open round still waiting for it. A round is
    complete when every worker it waits for has answered, or has died, or at its deadline
    (then the missing ones are errors). Applied only when every worker applied it. A worker
    started after the signal replays it to catch up: not a new reload, not counted.
    """

    WAIT = 10.0

    def __init__(self) -> None:
        self._open: list[_Round] = []

    def open(self, workers: set[int], now: float) -> None:
        self._open.append(_Round(set(workers), now + self.WAIT))

    def outcome(self, worker: int, outcome: Outcome) -> None:
        for round_ in self._open:
            if worker in round_.expected and worker not in round_.outcomes:
                round_.outcomes[worker] = outcome
                return

    def gone(self, worker: int) -> None:
        """A worker died: the rounds stop waiting for it."""
        for round_ in self._open:
            if worker not in round_.outcomes:
                round_.expected.discard(worker)

    def next_deadline(self) -> float | None:
        return min((r.deadline for r in self._open), default=None)

    def settle(self, now: float) -> list[Outcome]:
        """The rounds complete now, oldest first, each as one outcome."""
        done: list[Outcome] = []
        while self._open:
            first = self._open[0]
            complete = first.expected <= set(first.outcomes)
            if not complete and now < first.deadline:
                break
            self._open.pop(0)
            done.append(_combine(first))
        return done


def _combine(round_: _Round) -> Outcome:
    errors: list[str] = []
    for index in sorted(round_.expected):
        got = round_.outcomes.get(index)
        if got is None:
            errors.append(f"worker {index}: no outcome within {Rounds.WAIT:g}s")
        elif not got.applied:
            errors += [f"worker {index}: {e}" for e in got.errors or ("refused",)]
    summary = next((o.summary for o in round_.outcomes.values() if o.applied), "")
    if not round_.outcomes and not round_.expected:
        errors.append("no worker was running to apply it")
    return Outcome(not errors, tuple(errors), summary)
