"""Where the machine's CPU goes per keep-alive request and per GB: /proc/stat field by field.

For issue 16's kernel relay: with a kernel data path the work leaves the balancer's process, so
this splits the machine-wide busy time (all cores, ``/proc/stat``) into user, system and softirq,
and shows the CPU of the kernel's worker threads (``kworker/*``, where the psock backlog work
runs; ``ksoftirqd/*``) and of the balancer's own process, each per operation, for each contender
and minus the *direct* run. ``known`` is the CPU of the processes of the test (balancer, load
generator, backend) plus the kernel's worker threads: what other sessions' load on a shared
machine does not inflate (with tick-based accounting, ``CONFIG_IRQ_TIME_ACCOUNTING`` off as on
this machine, softirq time is also charged to whichever task it interrupted, so the softirq field
overlaps it). Same set-up as ``bench/run.py`` (one nginx backend, balancers pinned
to core 1, load to core 0)::

    python bench/kernel_split.py --contenders direct,haproxy,l4lb-splice,l4lb-kernel --rounds 3

The machine is shared: anything else running counts too. Read the fields within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import contenders as cont
from harness import procs
from harness.figures import Settings, parse_wrk

BENCH = Path(__file__).resolve().parent
FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
TICK = 1.0 / procs.CLOCK_TICKS


def machine() -> dict[str, float]:
    """Seconds of every core per /proc/stat field."""
    with open("/proc/stat") as f:
        vals = f.readline().split()[1:9]
    return {k: int(v) * TICK for k, v in zip(FIELDS, vals, strict=True)}


def kernel_threads() -> dict[str, float]:
    """CPU seconds of the kernel's worker threads, by kind (kworker, ksoftirqd)."""
    out = {"kworker": 0.0, "ksoftirqd": 0.0}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        kind = comm.split("/")[0]
        if kind in out:
            fields = text[text.rindex(")") + 2 :].split()
            out[kind] += (int(fields[11]) + int(fields[12])) * TICK
    return out


def own(pids: list[int]) -> dict[str, float]:
    user = system = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        user += int(fields[11]) * TICK
        system += int(fields[12]) * TICK
    return {"balancer_user": user, "balancer_system": system}


BACKEND: list[int] = []
"""The backend nginx's pid (its processes are counted as ``backend``)."""


def children() -> dict[str, float]:
    """CPU of this script's finished children: the load generator (wrk or curl)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"generator": r.ru_utime + r.ru_stime}


def sample(pids: list[int]) -> dict[str, float]:
    tree = procs.tree(BACKEND[0]) if BACKEND else []
    backend = own(tree)
    return (
        machine()
        | kernel_threads()
        | own(pids)
        | children()
        | {"backend": backend["balancer_user"] + backend["balancer_system"]}
    )


def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b[k] - a[k] for k in a}


def keepalive(c: cont.Contender, s: Settings) -> tuple[dict[str, float], float]:
    argv = [
        "wrk",
        "-t1",
        f"-c{s.wrk_connections}",
        "-d3s",
        "--latency",
        f"http://127.0.0.1:{c.port}/tiny",
    ]
    warm = ["wrk", "-t1", f"-c{s.wrk_connections}", "-d1s", f"http://127.0.0.1:{c.port}/tiny"]
    subprocess.run(procs.pinned(s.generator_core, warm), capture_output=True, check=True)
    before = sample(c.pids())
    out = subprocess.run(
        procs.pinned(s.generator_core, argv), capture_output=True, text=True, check=True
    ).stdout
    after = sample(c.pids())
    return delta(before, after), float(parse_wrk(out)["requests"])  # type: ignore[arg-type]


def bulk(c: cont.Contender, s: Settings) -> tuple[dict[str, float], float]:
    argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{size_download}",
            f"http://127.0.0.1:{c.port}/big.bin"]  # fmt: skip
    before = sample(c.pids())
    out = subprocess.run(procs.pinned(s.generator_core, argv), capture_output=True, text=True)
    after = sample(c.pids())
    return delta(before, after), int(out.stdout) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--contenders", default="direct,haproxy,l4lb-splice,l4lb-kernel")
    ap.add_argument("--figures", default="keepalive,bulk1")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    s = Settings()
    work = BENCH / "work" / ("split-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    data = BENCH / "data"
    cont.make_big_file(data / "big.bin", s.bulk_bytes)
    backend = cont.Backend(work / "backend", data, s.generator_core)
    backend.start()
    assert backend.proc is not None
    BACKEND.append(backend.proc.pid)
    names = args.contenders.split(",")
    running = [cont.make(n, work, backend, s.balancer_core) for n in names]
    figures = {"keepalive": keepalive, "bulk1": bulk}
    taken: dict[str, dict[str, list[dict[str, float]]]] = {}
    try:
        for c in running:
            c.start()
        for fig in args.figures.split(","):
            for _ in range(args.rounds):
                for c in running:
                    d, ops = figures[fig](c, s)
                    d["known"] = (
                        d["balancer_user"] + d["balancer_system"] + d["generator"]
                        + d["backend"] + d["kworker"] + d["ksoftirqd"]
                    )  # fmt: skip
                    per = {k: v / ops for k, v in d.items()}
                    taken.setdefault(fig, {}).setdefault(c.name, []).append(per)
    finally:
        for c in running:
            c.stop()
        backend.stop()
    unit = {"keepalive": ("us per request", 1e6), "bulk1": ("s per GB", 1.0)}
    result: dict[str, dict[str, dict[str, float]]] = {}
    keys = ("user", "system", "softirq", "kworker", "balancer_user", "balancer_system",
            "generator", "backend", "known")  # fmt: skip
    for fig, by in taken.items():
        name, scale = unit[fig]
        print(f"\n{fig}: {name}, medians of {args.rounds}")
        med = {
            c: {k: statistics.median(r[k] for r in rows) * scale for k in keys}
            for c, rows in by.items()
        }
        base = med.get("direct")
        heads = [*keys, "busy-direct", "known-direct"]
        print(f"{'contender':<14}" + "".join(f"{k:>16}" for k in heads))
        for c, m in med.items():
            busy = m["user"] + m["system"] + m["softirq"]
            cells = [m[k] for k in keys]
            if base is not None:
                cells.append(busy - (base["user"] + base["system"] + base["softirq"]))
                cells.append(m["known"] - base["known"])
            print(f"{c:<14}" + "".join(f"{v:16.2f}" for v in cells))
        result[fig] = med
    if args.out:
        args.out.write_text(
            json.dumps({"argv": sys.argv, "medians": result, "raw": taken}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
