"""Count what one new connection costs l4lb, with figures a loaded machine does not move.

    python bench/syscalls.py --relay stream --conns 2000          # system calls (strace -c)
    python bench/syscalls.py --relay splice --instructions        # + user instructions (callgrind)
    python bench/syscalls.py --relay splice --no-syscalls --window 3   # same, around the load only
    python bench/syscalls.py --relay splice,nginx,haproxy --conns 2000  # the peers, counted alike

Starts the bench's nginx backend and one l4lb (``workers = 1``), opens ``--conns`` connections
(``--parallel`` at a time), each sending ``GET /tiny`` with ``Connection: close`` and reading to
the end, and prints the system calls per connection by name, as ``strace -c -f`` counted them in
the l4lb worker. With ``--instructions`` it runs a second l4lb under ``valgrind --tool=callgrind``
twice (no connections, then ``--conns``) and prints the difference of user-space instructions
per connection (the interpreter's work; the kernel's is not counted, the system calls are).
With ``--window R`` it instead starts one l4lb under callgrind with instrumentation off, warms it
up (300 connections), and counts only while each of R rounds of ``--conns`` connections runs
(``callgrind_control -i on``/``off``): no start-up, no idle timers of a longer run, so the
figure moves by about 0.5 % between rounds instead of the two-run difference's 3 %.
Both figures are counts, not times: other processes on the machine do not change them.
``--relay nginx`` or ``haproxy`` counts that peer's system calls the same way (its bench
configuration: one nginx worker, one HAProxy thread, each sending PROXY v2).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness import contenders as cont
from harness import procs

BENCH = Path(__file__).resolve().parent
REQUEST = b"GET /tiny HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


async def _one(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(REQUEST)
    data = await reader.read()
    writer.close()
    if not data.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected answer {data[:60]!r}")


async def _load(port: int, conns: int, parallel: int) -> None:
    left = iter(range(conns))

    async def worker() -> None:
        for _ in left:
            await _one(port)

    await asyncio.gather(*(worker() for _ in range(parallel)))


def load(port: int, conns: int, parallel: int) -> None:
    """``conns`` connections through ``port``, ``parallel`` at a time."""
    asyncio.run(_load(port, conns, parallel))


def _config(workdir: Path, relay: str, port: int, backend: cont.Backend) -> Path:
    lb = cont.L4lb(f"l4lb-{relay}", workdir, backend, None, relay=relay)
    argv = lb.argv()
    assert argv is not None
    text = (workdir / "l4lb.toml").read_text().replace(f":{lb.port}", f":{port}")
    cfg = workdir / "l4lb.toml"
    cfg.write_text(text)
    return cfg


def _start(argv: list[str], log: Path, port: int) -> subprocess.Popen[bytes]:
    proc = procs.start(argv, None, log)
    procs.wait_port(port, proc, timeout=120.0)
    return proc


def _worker(proc: subprocess.Popen[bytes]) -> int:
    """The process that accepts (the worker, or the only process)."""
    tree = procs.tree(proc.pid)
    return tree[-1]


PEERS = ("nginx", "haproxy")
"""``--relay`` names that count a peer's system calls instead of l4lb's."""


def _start_peer(
    name: str, backend: cont.Backend, work: Path
) -> tuple[subprocess.Popen[bytes], int]:
    """The peer as the bench runs it (unpinned), and its port."""
    peer = cont.make(name, work, backend, None)
    peer.workdir.mkdir(parents=True, exist_ok=True)
    argv = peer.argv()
    assert argv is not None
    return _start(argv, work / name / "stdout.log", peer.port), peer.port


def count_syscalls(
    relay: str, conns: int, parallel: int, backend: cont.Backend, work: Path
) -> None:
    work.mkdir(parents=True, exist_ok=True)
    if relay in PEERS:
        proc, port = _start_peer(relay, backend, work)
    else:
        port = procs.free_port()
        cfg = _config(work, relay, port, backend)
        exe = Path(sys.executable).parent / "l4lb"
        proc = _start([str(exe), "run", "--config", str(cfg)], work / "stdout.log", port)
    try:
        load(port, 200, parallel)  # warm-up: pools, caches, the pipe pool
        out = work / "strace.txt"
        tracer = subprocess.Popen(
            ["strace", "-c", "-f", "-o", str(out), "-p", str(_worker(proc))],
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # strace attaches
        load(port, conns, parallel)
        time.sleep(0.5)  # the last closes
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
    finally:
        procs.stop(proc)
    rows = []
    total = 0
    for line in out.read_text().splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
        if m and m.group(2) != "total":
            rows.append((int(m.group(1)), m.group(2)))
            total += int(m.group(1))
    rows.sort(reverse=True)
    who = relay if relay in PEERS else f"relay={relay}"
    print(f"{who}: {total / conns:.1f} system calls per connection ({conns} connections)")
    for n, name in rows:
        if n / conns >= 0.05:
            print(f"  {n / conns:6.2f}  {name}")


def _callgrind_total(path: Path) -> int:
    # "totals:": a dump taken with instrumentation toggled says "summary: 0"
    lines = path.read_text().splitlines()
    for key in ("totals:", "summary:"):
        for line in lines:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def count_instructions(
    relay: str, conns: int, parallel: int, backend: cont.Backend, work: Path
) -> None:
    totals = []
    for n in (0, conns):
        d = work / f"callgrind-{n}"
        d.mkdir(parents=True, exist_ok=True)
        port = procs.free_port()
        cfg = _config(d, relay, port, backend)
        out = d / "callgrind.out"
        py = Path(sys.executable)
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                str(py), "-m", "l4lb", "run", "--config", str(cfg)]  # fmt: skip
        proc = _start(argv, d / "stdout.log", port)
        try:
            load(port, n, parallel)
            time.sleep(1.0)
        finally:
            procs.stop(proc, timeout=120.0)
        totals.append(_callgrind_total(out))
    per = (totals[1] - totals[0]) / conns
    print(f"relay={relay}: {per:,.0f} user-space instructions per connection (callgrind)")


def count_instructions_window(
    relay: str, conns: int, parallel: int, backend: cont.Backend, work: Path, rounds: int
) -> None:
    work.mkdir(parents=True, exist_ok=True)
    port = procs.free_port()
    cfg = _config(work, relay, port, backend)
    out = work / "callgrind.out"
    py = Path(sys.executable)
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
            str(py), "-m", "l4lb", "run", "--config", str(cfg)]  # fmt: skip
    proc = _start(argv, work / "stdout.log", port)

    def control(*args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(proc.pid)], check=True, capture_output=True)

    try:
        load(port, 300, parallel)  # warm-up, not counted
        for i in range(rounds):
            control("-z")
            control("-i", "on")
            load(port, conns, parallel)
            time.sleep(0.3)  # the last closes
            control("-i", "off")
            control("-d", f"round{i}")
    finally:
        procs.stop(proc, timeout=120.0)
    per = [_callgrind_total(f) / conns for f in sorted(work.glob("callgrind.out.*"))]
    shown = " ".join(f"{p:,.0f}" for p in per)
    median = sorted(per)[len(per) // 2]
    print(f"relay={relay}: {median:,.0f} user-space instructions per connection "
          f"(callgrind around the load, median of {shown})")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--relay", default="stream")
    ap.add_argument("--conns", type=int, default=2000)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--instructions", action="store_true", help="also count instructions")
    ap.add_argument("--no-syscalls", action="store_true", help="skip the strace count")
    ap.add_argument(
        "--window", type=int, default=0, metavar="R", help="count instructions around R rounds"
    )
    args = ap.parse_args()
    work = BENCH / "work" / f"syscalls-{time.strftime('%Y%m%dT%H%M%S')}"
    backend = cont.Backend(work / "backend", BENCH / "data", None)
    (BENCH / "data").mkdir(exist_ok=True)
    backend.start()
    try:
        for relay in args.relay.split(","):
            if not args.no_syscalls:
                count_syscalls(relay, args.conns, args.parallel, backend, work / relay)
            if relay in PEERS:
                continue  # instructions: l4lb only
            if args.instructions:
                count_instructions(relay, args.conns, args.parallel, backend, work / relay)
            if args.window:
                where = work / relay / "window"
                count_instructions_window(
                    relay, args.conns, args.parallel, backend, where, args.window
                )
    finally:
        backend.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
