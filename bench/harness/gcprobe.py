"""Run l4lb with its cyclic-garbage-collector pauses recorded (``bench/run.py --gc-pauses``).

The same ``l4lb`` command line, in the same interpreter, with one ``gc.callbacks`` hook that times
every collection; at exit (the bench stops l4lb with SIGTERM, which it answers by returning) it
writes, per generation, how many collections ran, the longest, the total, and when each full
(generation 2) collection happened, as JSON to ``$L4LB_BENCH_GC_OUT``; under ``serving``, the
same for the collections after the first full one (``runtime.settle_gc``'s, once the listeners
are up), i.e. what connections met, without start-up's imports. It observes only: nothing in
l4lb's own behaviour changes.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import sys
import time
from typing import Any

_START = time.perf_counter()
_pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
_serving: dict[int, list[float]] = {0: [], 1: [], 2: []}
"""Pauses after the first full collection (settle_gc's): while serving."""
_collected: dict[int, int] = {0: 0, 1: 0, 2: 0}
_full_at: list[float] = []
_began = [0.0]


def _timed(phase: str, info: dict[str, Any]) -> None:
    now = time.perf_counter()
    if phase == "start":
        _began[0] = now
        return
    generation = int(info["generation"])
    pause = (now - _began[0]) * 1e3
    _pauses[generation].append(pause)
    if _full_at:
        _serving[generation].append(pause)
    _collected[generation] += int(info["collected"])
    if generation == 2:
        _full_at.append(round(now - _START, 3))


def _stats(pauses: list[float]) -> dict[str, Any]:
    ordered = sorted(pauses)
    return {
        "collections": len(ordered),
        "max_ms": round(ordered[-1], 3) if ordered else None,
        "total_ms": round(sum(ordered), 1),
    }


def summary() -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["serving"] = {f"gen{g}": _stats(p) for g, p in _serving.items()}
    for generation, pauses in _pauses.items():
        ordered = sorted(pauses)
        out[f"gen{generation}"] = {
            "collections": len(ordered),
            "collected": _collected[generation],
            "max_ms": round(ordered[-1], 3) if ordered else None,
            "p50_ms": round(ordered[len(ordered) // 2], 3) if ordered else None,
            "total_ms": round(sum(ordered), 1),
        }
    out["full_collections_at_s"] = _full_at
    out["frozen_objects"] = gc.get_freeze_count()
    out["tracked_objects_at_exit"] = len(gc.get_objects())
    return out


def _write() -> None:
    path = os.environ.get("L4LB_BENCH_GC_OUT")
    if path:
        with open(path, "w") as f:
            json.dump(summary(), f)


def main() -> int:
    gc.callbacks.append(_timed)
    atexit.register(_write)
    from l4lb.cli import main as l4lb_main

    return int(l4lb_main(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
