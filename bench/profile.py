"""Profile l4lb under one load of the bench with py-spy, and print where its time goes.

    python bench/profile.py --relay stream --load newconn --seconds 10
    python bench/profile.py --relay splice --load bulk

Starts the bench's nginx backend and one l4lb (workers = 1, pinned like in the bench), runs the
load, records with ``py-spy record --native --format raw`` and prints the top functions by
self time and by inclusive time (the collapsed stacks and a flame graph land in bench/work/).
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import time
from pathlib import Path

from harness import contenders as cont
from harness import procs
from harness.figures import HERE

BENCH = Path(__file__).resolve().parent


def load_argv(kind: str, port: int, seconds: int) -> list[str]:
    url = f"http://127.0.0.1:{port}"
    if kind == "newconn":
        return ["wrk", "-t1", "-c32", f"-d{seconds}s", "-H", "Connection: close", f"{url}/tiny"]
    if kind == "keepalive":
        return ["wrk", "-t1", "-c32", f"-d{seconds}s", f"{url}/tiny"]
    if kind == "paced":
        return [sys.executable, str(HERE / "paced.py"), "--port", str(port), "--rate", "1000",
                "--duration", str(seconds)]  # fmt: skip
    if kind == "bulk":
        curl = f"curl -s -o /dev/null {url}/big.bin"
        return ["sh", "-c", f"for i in $(seq {seconds}); do {curl} & {curl} & wait; done"]
    raise SystemExit(f"unknown load {kind!r}")


def summarize(raw: Path, top: int) -> str:
    """Top functions by self and inclusive samples from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f]
        frames = frames[1:] if frames and frames[0].startswith("process") else frames
        if not frames:
            continue
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    out = [f"{total} samples", "", "self:"]
    out += [f"  {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    out += ["", "inclusive:"]
    out += [f"  {n / total:6.1%}  {f}" for f, n in incl.most_common(top)]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--relay", default="stream", choices=["stream", "splice"])
    ap.add_argument("--load", default="newconn", choices=["newconn", "keepalive", "paced", "bulk"])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--native", action="store_true", help="include C frames (slower sampling)")
    ap.add_argument("--svg", type=Path, help="write a flame graph SVG there instead of the summary")
    args = ap.parse_args()
    work = BENCH / "work" / f"profile-{time.strftime('%Y%m%dT%H%M%S')}"
    backend = cont.Backend(work / "backend", BENCH / "data", 0)
    cont.make_big_file(BENCH / "data" / "big.bin", 512 << 20)
    backend.start()
    lb = cont.L4lb(f"l4lb-{args.relay}", work / "l4lb", backend, 1, relay=args.relay)
    try:
        lb.start()
        if lb.error or lb.proc is None:
            raise SystemExit(f"l4lb did not start: {lb.error}")
        raw = args.svg or work / "profile.txt"
        spy = [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(lb.proc.pid),
               "--format", "flamegraph" if args.svg else "raw", "-o", str(raw),
               "--duration", str(args.seconds + 1), "--rate", "250"]  # fmt: skip
        if args.native:
            spy.append("--native")
        recorder = subprocess.Popen(spy, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)
        with procs.CpuWindow(lb.pids()) as cpu:
            subprocess.run(
                procs.pinned(0, load_argv(args.load, lb.port, args.seconds)),
                stdout=subprocess.DEVNULL,
                check=False,
            )
        recorder.wait(60)
        print(f"l4lb used {cpu.balancer_cpu / cpu.wall:.0%} of its core; stacks in {raw}")
        if not args.svg:
            print(summarize(raw, args.top))
    finally:
        lb.stop()
        backend.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
