"""One connection at a time through each contender: where a new connection's latency goes.

Starts the bench's nginx backend and the named contenders (as ``bench/run.py`` does: balancers on
core 1, this client and the backend on core 0), then opens ``--conns`` connections per contender,
one at a time and alternating between contenders, each sending ``GET /tiny`` with
``Connection: close``. For each it times, on the client:

- ``connect``: ``connect()`` to writable (the balancer's kernel answers the handshake: the same
  for every contender);
- ``first``: the request sent to the first byte of the answer: the balancer's accept, its backend
  connect, the PROXY header and the request on to the backend, nginx's answer, and the relay of it;
- ``rest``: the first byte to the end (the balancer passing on the backend's FIN);
- ``total``: from ``connect()`` to the end.

No load, no queueing: what is left is each balancer's own path, the figure behind its p50 at a
fixed rate. Medians and 90th percentiles, in milliseconds::

    python bench/latency.py --contenders haproxy,nginx,l4lb-splice --conns 400
    PYTHONPATH=<another checkout's src> python bench/latency.py ...   # that l4lb, same client
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import sys
import time
from pathlib import Path

from harness import contenders as cont

BENCH = Path(__file__).resolve().parent
REQUEST = b"GET /tiny HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
STEPS = ("connect", "first", "rest", "total")


def one(port: int, timeout: float = 5.0) -> tuple[float, float, float, float]:
    """(connect, first, rest, total) in seconds for one connection to 127.0.0.1:port."""
    clock = time.perf_counter
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setblocking(False)
        t0 = clock()
        s.connect_ex(("127.0.0.1", port))
        if not select.select([], [s], [], timeout)[1]:
            raise TimeoutError("connect")
        t1 = clock()
        s.send(REQUEST)
        t2 = clock()
        if not select.select([s], [], [], timeout)[0]:
            raise TimeoutError("answer")
        chunk = s.recv(4096)
        t3 = clock()
        while chunk:
            if not select.select([s], [], [], timeout)[0]:
                raise TimeoutError("end")
            chunk = s.recv(4096)
        t4 = clock()
    finally:
        s.close()
    return t1 - t0, t3 - t2, t4 - t3, t4 - t0


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--contenders", default="haproxy,nginx,l4lb-splice")
    ap.add_argument("--conns", type=int, default=400, help="connections per contender")
    ap.add_argument("--warmup", type=int, default=50, help="connections first, not counted")
    ap.add_argument("--workdir", type=Path, default=BENCH / "work" / "latency")
    args = ap.parse_args(argv)
    names = [n for n in args.contenders.split(",") if n]
    pin = (os.cpu_count() or 1) >= 2
    gen_core, bal_core = (0, 1) if pin else (None, None)
    data = args.workdir / "data"  # only /tiny is asked for: nginx answers it from its config
    data.mkdir(parents=True, exist_ok=True)
    backend = cont.Backend(args.workdir / "backend", data, gen_core)
    backend.start()
    running = [cont.make(n, args.workdir, backend, bal_core) for n in names]
    taken: dict[str, list[tuple[float, float, float, float]]] = {n: [] for n in names}
    try:
        for c in running:
            c.start()
            if c.error:
                print(f"{c.name}: not measured: {c.error}", file=sys.stderr)
        live = [c for c in running if c.error is None]
        if gen_core is not None:
            os.sched_setaffinity(0, {gen_core})
        for c in live:
            for _ in range(args.warmup):
                one(c.port)
        for i in range(args.conns):
            # alternate, each round starting one further along (load from elsewhere drifts)
            for c in live[i % len(live) :] + live[: i % len(live)]:
                taken[c.name].append(one(c.port))
                time.sleep(0.001)
    finally:
        for c in running:
            c.stop()
        backend.stop()
    print(f"one connection at a time, {args.conns} per contender; ms, p50 / p90")
    print(f"| {'contender':<14} | " + " | ".join(f"{s:>13}" for s in STEPS) + " |")
    print("|" + "-" * 16 + "|" + "|".join("-" * 15 for _ in STEPS) + "|")
    for name, rows in taken.items():
        if not rows:
            continue
        cols = list(zip(*rows, strict=True))
        cells = [f"{_pct(list(col), 0.5):5.3f} / {_pct(list(col), 0.9):5.3f}" for col in cols]
        print(f"| {name:<14} | " + " | ".join(f"{x:>13}" for x in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
