"""The outcome of the last reload, written to a small file for ``l4lb reload`` to read.

A signal carries no answer: ``kill -HUP`` succeeds whether the new config is applied or
refused. So the process that handled the reload writes ``reload-status.json`` in its runtime
directory (``$L4LB_RUNTIME_DIR``, else systemd's ``$RUNTIME_DIRECTORY`` from the unit's
``RuntimeDirectory=``): the pid the signal went to (the supervisor's with several workers),
the time, ``event=reloaded`` or ``event=reload_rejected`` and the errors. The file is replaced
atomically (written aside, then renamed), so a reader never sees half of it. Without a runtime
directory nothing is written; a failure to write is logged, never raised.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

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
