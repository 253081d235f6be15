"""`make bench`: l4lb side by side with HAProxy and nginx on one machine, in one run.

The same real nginx backend serves every contender (``listen … proxy_protocol`` for the balancers,
a plain listener for "direct"). Each balancer gets one CPU: HAProxy ``nbthread 1`` with
``send-proxy-v2``, nginx stream with ``proxy_protocol on`` and one worker, l4lb with
``workers = 1`` in each relay mode (``l4lb-kernel``: the eBPF sockmap relay, as root). Balancers
are pinned to core 1; the load generators and the backend to core 0. Every figure is measured
for every contender in turn before the next figure.

    python bench/run.py                 # the full run (about 3 minutes), JSON in bench/results/
    python bench/run.py --quick              # seconds; a smoke test of the harness itself
    python bench/run.py --contenders haproxy,l4lb-stream --figures newconn,idle
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from harness import contenders as cont
from harness import targets
from harness.figures import MEASUREMENTS, SINGLE_ROUND, Settings, add_machine_net, merge_rounds
from harness.report import table

BENCH = Path(__file__).resolve().parent
ALL = [
    "direct",
    "haproxy",
    "haproxy-splice",
    "nginx",
    "l4lb-stream",
    "l4lb-splice",
    "l4lb-kernel",
]


def _git_commit() -> str:
    """The commit measured, with ``-dirty`` when tracked files differ from it."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(BENCH), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(BENCH), "diff", "--quiet", "HEAD"]).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny durations and sizes (smoke test)")
    ap.add_argument("--contenders", default=",".join(ALL))
    ap.add_argument("--figures", default=",".join(MEASUREMENTS))
    ap.add_argument("--out", type=Path, help="JSON file (default bench/results/<time>.json)")
    ap.add_argument("--workdir", type=Path, default=BENCH / "work")
    ap.add_argument("--no-pin", action="store_true", help="do not pin to cores (taskset)")
    ap.add_argument(
        "--gc-pauses",
        action="store_true",
        help="run l4lb under harness/gcprobe.py: its garbage-collector pauses go in the JSON",
    )
    ap.add_argument(
        "--rounds", type=int, help="rounds per figure, median kept (default 3; quick 1)"
    )
    args = ap.parse_args(argv)

    names = [n for n in args.contenders.split(",") if n]
    figures = [f for f in args.figures.split(",") if f]
    for f in figures:
        if f not in MEASUREMENTS:
            ap.error(f"unknown figure {f!r}; choose from {', '.join(MEASUREMENTS)}")
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    gen_core, bal_core = (0, 1) if pin else (None, None)
    if args.quick:
        settings = Settings(
            generator_core=gen_core, balancer_core=bal_core, wrk_seconds=1, wrk_connections=8,
            bulk_bytes=8 << 20, bulk_many_bytes=4 << 20, bulk_streams=2, paced_rate=200,
            paced_seconds=0.5, hold_count=100, warmup_seconds=0,
        )  # fmt: skip
        data = args.workdir / "quick-data"
    else:
        settings = Settings(generator_core=gen_core, balancer_core=bal_core)
        data = BENCH / "data"
    rounds = args.rounds or (1 if args.quick else 3)

    # every process we start inherits this: the holder and the balancers need ~20,000 fds
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    load_before = os.getloadavg()
    commit = _git_commit()
    build = targets.build(sys.executable)
    work = args.workdir / stamp
    print(f"bench {stamp}: contenders {', '.join(names)}; work files in {work}", flush=True)
    print(
        f"  commit {commit}; l4lb build: {build['build']}; load average "
        f"{load_before[0]:.2f} at start",
        flush=True,
    )
    cont.make_big_file(data / "big.bin", settings.bulk_bytes)
    backend = cont.Backend(work / "backend", data, gen_core)
    backend.start()
    # the file in the page cache before anyone is timed
    subprocess.run(
        ["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{backend.plain_port}/big.bin"],
        check=True,
    )
    running = [cont.make(n, work, backend, bal_core) for n in names]
    if args.gc_pauses:
        for c in running:
            if isinstance(c, cont.L4lb):
                c.gc_out = c.workdir / "gc.json"
    results: dict[str, dict[str, Any]] = {n: {} for n in names}
    try:
        for c in running:
            c.start()
            if c.error:
                print(f"  {c.name}: not measured: {c.error}", flush=True)
                results[c.name]["error"] = c.error
        live = [c for c in running if c.error is None]
        for fig in figures:
            n = 1 if fig in SINGLE_ROUND else rounds
            taken: dict[str, list[dict[str, Any]]] = {c.name: [] for c in live}
            for r in range(n):
                # contenders alternate within every round, and each round starts one further
                # along: none always follows the same one (load from elsewhere drifts in time)
                for c in live[r % len(live) :] + live[: r % len(live)]:
                    t = time.monotonic()
                    try:
                        res = MEASUREMENTS[fig](c, settings)
                    except Exception as err:  # one failed figure must not lose the rest
                        traceback.print_exc()
                        res = {"failed": f"{type(err).__name__}: {err}"}
                    if c.proc is not None and c.proc.poll() is not None:
                        res["failed"] = f"balancer exited with {c.proc.returncode}"
                    taken[c.name].append(res)
                    brief = {k: v for k, v in res.items() if k != "core_busy"}
                    label = f"{fig}#{r + 1}" if n > 1 else fig
                    print(
                        f"  {label:<11} {c.name:<14} {time.monotonic() - t:5.1f}s {brief}",
                        flush=True,
                    )
            for c in live:
                results[c.name][fig] = merge_rounds(taken[c.name])
    finally:
        for c in running:
            c.stop()
        backend.stop()
    for c in running:
        if isinstance(c, cont.L4lb) and c.gc_out is not None and c.gc_out.exists():
            results[c.name]["gc"] = gc = json.loads(c.gc_out.read_text())
            print(
                f"  gc pauses {c.name}: "
                + "; ".join(
                    f"{g} {gc[g]['collections']}× max {gc[g]['max_ms']} ms"
                    for g in ("gen0", "gen1", "gen2")
                )
                + f"; full collections at {gc['full_collections_at_s']} s",
                flush=True,
            )
            serving = gc.get("serving", {})
            print(
                "    after the first full one (while serving): "
                + "; ".join(
                    f"{g} {serving[g]['collections']}× max {serving[g]['max_ms']} ms"
                    for g in ("gen0", "gen1", "gen2")
                    if g in serving
                ),
                flush=True,
            )

    load_after = os.getloadavg()
    add_machine_net(results)
    print()
    print(table(results, names))
    print("\n† load-generator-bound: core 0 ≥ 90 % busy while the balancer used < 85 % of core 1")
    print(
        "machine CPU: busy time of every core (/proc/stat) per operation, minus the same for "
        "direct;\nit counts anything else running on the machine too: on a shared machine, "
        "read it within one run only"
    )
    checked = targets.check_all(results, names)
    print(
        "\nIssue 16's targets (ratio = l4lb ÷ reference; † that side was load-generator-bound;"
        "\n‡ half or more of that side's p99 was its paced generator's own lateness)"
    )
    print(targets.table(checked) if checked else "none checked: no l4lb-splice or l4lb-kernel ran")
    compiled = ", ".join(build.get("compiled", [])) or "none"
    print(
        f"commit {commit}; l4lb build: {build['build']} (compiled modules: {compiled}); "
        f"load average {load_before[0]:.2f} at start, {load_after[0]:.2f} at end "
        f"({os.cpu_count()} cores)"
    )
    doc = {
        "time": stamp,
        "commit": commit,
        "build": build,
        "quick": args.quick,
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "loadavg_at_start": load_before,
            "loadavg_at_end": load_after,
        },
        "settings": {k: getattr(settings, k) for k in settings.__slots__},
        "rounds": rounds,
        "results": results,
        "targets": checked,
    }
    out = args.out or (work / "results.json" if args.quick else BENCH / "results" / f"{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
