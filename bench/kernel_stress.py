"""Stress the kernel relay (``relay = "kernel"``) with a destination that stalls; check every byte.

Issue 16: under load the kernel relay once delivered one 65,483-byte segment twice (or a right
length with wrong bytes) to a destination that stalls. Each run makes one kernel-relayed
connection (``l4lb.balancer.kernel_relay`` on its own event loop, in this process; ``--mode
handover`` starts it on splice as ``relay = "kernel"`` does) and pushes ``--size`` MiB from a
backend to a client that reads in one of two patterns, while ``--load`` processes keep the cores
busy:

- ``stalls``: pauses (up to ``--stall-ms``) every ``--stall-every`` KiB on average, so the
  destination falls behind, the program runs into its credit, hands the direction back, and the
  process copies and re-arms it, again and again;
- ``blocked``: nothing until the backend's send has blocked for a second, then everything
  (``test_a_client_reading_nothing_bounds_what_the_kernel_queues``, which failed under the
  whole suite's load).

Client and backend are child processes (``--threads``: threads of this process, one GIL with the
relay, as in the tests); ``--both`` sends the same the other way too. The bytes are 8-byte words
that each hold their own offset, so a reader says where the first wrong byte is and what came
instead (``got``: the offset those bytes were sent at; one segment twice shows as a jump back by
its length). Each run prints one line with the program's ``stale`` count (bytes cut from
retransmissions that overlap received bytes), the bytes the process copied itself, and the bytes
TCP retransmitted (backend -> relay, client -> relay: ``tcp_info.tcpi_bytes_retrans``); a wrong
run prints every counter of both directions. Needs root (or CAP_BPF + CAP_NET_ADMIN)::

    python bench/kernel_stress.py --runs 50 --pattern blocked --stall-every 0 --read-size 64

Another copy of the code runs with ``PYTHONPATH=<copy>/src`` (e.g. the program before a fix).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from l4lb.balancer import kernel_path as kp
from l4lb.balancer import kernel_relay
from l4lb.balancer.kernel_relay import AT_ONCE, HANDOVER, KernelRelay
from l4lb.balancer.relay_contract import EndReason, default_relay

MB = 1 << 20


@dataclass
class Conn:
    """What the relay reports to (the balancer's connection, reduced to its counters)."""

    bytes_from_client: int = 0
    bytes_to_client: int = 0
    reasons: list[str] = field(default_factory=list)
    done: asyncio.Event | None = None

    def relay_closed(self, reason: str) -> None:
        self.reasons.append(reason)
        if self.done is not None:
            self.done.set()


def pattern(size: int) -> bytes:
    """``size`` bytes of 8-byte little-endian words, each its own offset."""
    return array.array("Q", range(0, size, 8)).tobytes()[:size]


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(connected, accepted) over loopback."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    return a, b


def check(
    sock: socket.socket,
    data: bytes,
    stall_every: int,
    stall_ms: float,
    seed: int,
    go: int | None = None,
    read_size: int = 1 << 18,
) -> dict:
    """Read ``sock`` until EOF with pauses; where the first byte differs from ``data``.
    ``go``: a pipe to wait on before the first read (the sender writes to it once blocked)."""
    rng = random.Random(seed)
    if go is not None:
        os.read(go, 1)
    view = memoryview(data)
    buf = bytearray(read_size)
    pos = 0
    bad: int | None = None
    got_word: int | None = None
    next_stall = rng.randint(1, 2 * stall_every) if stall_every else 1 << 62
    while True:
        n = sock.recv_into(buf)
        if n == 0:
            break
        if bad is None:
            end = min(pos + n, len(data))
            if buf[: end - pos] != view[pos:end] or pos + n > len(data):
                i = next(
                    (k for k in range(end - pos) if buf[k] != data[pos + k]),
                    end - pos,
                )
                bad = pos + i
                w = bad - bad % 8 - pos
                if w >= 0 and w + 8 <= n:
                    got_word = struct.unpack_from("<Q", buf, w)[0]
        pos += n
        if pos >= next_stall:
            time.sleep(rng.uniform(0, stall_ms) / 1000)
            next_stall = pos + rng.randint(1, 2 * stall_every)
    return {"received": pos, "bad": bad, "got": got_word}


TCP_INFO = {  # struct tcp_info fields (offset, struct format)
    "total_retrans": (100, "I"),
    "bytes_received": (128, "Q"),
    "bytes_sent": (200, "Q"),
    "bytes_retrans": (208, "Q"),
    "dsack_dups": (216, "I"),
    "rcv_ooopack": (224, "I"),
}


def tcp_info(sock: socket.socket) -> dict:
    """The TCP counters that say whether TCP itself resent or reordered anything."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 240)
    return {
        name: struct.unpack_from("<" + fmt, raw, off)[0]
        for name, (off, fmt) in TCP_INFO.items()
        if off + struct.calcsize(fmt) <= len(raw)
    }


def child(fn: object) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()  # type: ignore[operator]
            code = 0
        except BaseException as err:  # a child reports and exits
            print(f"child failed: {err!r}", file=sys.stderr)
        finally:
            os._exit(code)
    return pid


def side(
    mine: socket.socket,
    others: list[socket.socket],
    send: bytes | None,
    expect: bytes | None,
    out: int,
    args: argparse.Namespace,
    seed: int,
    blocked: int | None = None,
    go: int | None = None,
) -> None:
    """One end (client or backend): send ``send`` then FIN, read and check ``expect``.
    ``blocked``: a pipe to write to once a send has blocked for a second (``--pattern
    blocked``); ``go``: a pipe to wait on before reading."""
    for s in others:
        s.close()
    mine.setblocking(True)
    result: dict = {}
    if send is not None:

        def push() -> None:
            view = memoryview(send)
            pushed = 0
            if blocked is not None:
                mine.settimeout(1.0)
                with contextlib.suppress(TimeoutError):
                    while pushed < len(send):
                        pushed += mine.send(view[pushed : pushed + MB])
                os.write(blocked, b"x")
                mine.settimeout(None)
            mine.sendall(view[pushed:])
            mine.shutdown(socket.SHUT_WR)

        if expect is None:  # nothing to read until the FIN: push from here
            push()
            t = None
        else:
            t = threading.Thread(target=push)
            t.start()
    else:
        t = None  # the FIN after the last byte came (a socket that sent it cannot be inserted)
    if expect is not None:
        result = check(
            mine, expect, args.stall_every * 1024, args.stall_ms, seed, go, args.read_size * 1024
        )
    else:
        while mine.recv(1 << 16):
            pass
    if t is not None:
        t.join()
    elif send is None:
        mine.shutdown(socket.SHUT_WR)
    result["tcp"] = tcp_info(mine)
    os.write(out, json.dumps(result).encode() + b"\n")


def counters(relay: KernelRelay, to_client: bool) -> dict:
    d = relay.to_client if to_client else relay.to_backend
    out = {"user_bytes": d.user_bytes, "sent": d.sent, "consumed": d.consumed, "slot": d.slot}
    if d.slot >= 0:
        st = relay.path.state
        base = d.slot * kp.WORDS
        for name in ("redirected", "passed", "armed", "credit", "copied", "stale"):
            index = getattr(kp, name.upper(), None)  # (an older program counts no ``stale``)
            if index is not None:
                out[name] = int(st[base + index])
    return out


def one_run(i: int, data: bytes, path: kp.KernelPath, args: argparse.Namespace) -> dict:
    client, relay_client = tcp_pair()
    relay_backend, backend = tcp_pair()
    for s in (relay_client, relay_backend):
        s.setblocking(False)
        if args.rcvbuf:  # a small receive buffer: more drops, more retransmissions
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf * 1024)
    down_r, down_w = os.pipe()
    up_r, up_w = os.pipe()
    ours = [relay_client, relay_backend]
    up = data if args.both else None
    go_r, go_w = os.pipe() if args.pattern == "blocked" else (None, None)

    def read() -> None:
        others = [] if args.threads else [*ours, backend]
        side(client, others, up, data, down_w, args, args.seed + 2 * i, go=go_r)

    def send() -> None:
        others = [] if args.threads else [*ours, client]
        side(backend, others, data, up, up_w, args, args.seed + 2 * i + 1, blocked=go_w)

    threads: list[threading.Thread] = []
    if args.threads:  # as the tests run it: one process, one GIL
        threads = [threading.Thread(target=read), threading.Thread(target=send)]
        for t in threads:
            t.start()
        reader = sender = 0
    else:
        reader, sender = child(read), child(send)
        client.close()
        backend.close()
        os.close(down_w)
        os.close(up_w)
        for fd in (go_r, go_w):
            if fd is not None:
                os.close(fd)
    loop = kernel_relay_loop()
    conn = Conn()
    handover = AT_ONCE if args.mode == "at-once" else HANDOVER
    start = kernel_relay.make_start(default_relay(), lambda _: path, handover)
    relay: object = None
    t0 = time.monotonic()

    async def main() -> None:
        nonlocal relay
        conn.done = asyncio.Event()
        path.bind(asyncio.get_running_loop())
        relay = start(asyncio.get_running_loop(), relay_client, relay_backend, b"", conn)
        try:
            await asyncio.wait_for(conn.done.wait(), args.timeout)
        except TimeoutError:
            conn.reasons.append("timeout")

    kernel = None
    try:
        loop.run_until_complete(main())
        kernel = getattr(relay, "kernel", relay)
        info = {
            "down": counters(kernel, True) if isinstance(kernel, KernelRelay) else None,
            "up": counters(kernel, False) if isinstance(kernel, KernelRelay) else None,
        }
        if "timeout" in conn.reasons and not args.threads:
            for pid in (reader, sender):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    finally:
        if relay is not None:
            relay.close(EndReason.SHUTDOWN)  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            poller_forget(loop, path)
        loop.close()
    if args.threads:
        for t in threads:
            t.join(args.timeout)
        for sock in (client, backend):
            sock.close()
        for fd in (down_w, up_w, go_r, go_w):
            if fd is not None:
                os.close(fd)
    else:
        for pid in (reader, sender):
            os.waitpid(pid, 0)
    results = {}
    for name, fd in (("down", down_r), ("up", up_r)):
        with os.fdopen(fd, "rb") as f:
            text = f.read().decode().strip()
        results[name] = json.loads(text) if text else {"received": None}
    ok = "timeout" not in conn.reasons and all(
        r.get("bad") is None and r.get("received") in (None, len(data))
        for name, r in results.items()
        if name == "down" or args.both
    )
    return {
        "run": i,
        "ok": ok,
        "seconds": round(time.monotonic() - t0, 2),
        "reasons": conn.reasons,
        "kernel": isinstance(kernel, KernelRelay),
        "results": results,
        **info,
    }


def kernel_relay_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def poller_forget(loop: asyncio.AbstractEventLoop, path: kp.KernelPath) -> None:
    from l4lb.balancer import poller

    poller.for_loop(loop).forget(path.ring_fd)


def busy() -> None:
    while True:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--size", type=int, default=256, help="MiB each run (default 256)")
    parser.add_argument("--load", type=int, default=2, help="busy processes (default 2)")
    parser.add_argument("--mode", choices=("at-once", "handover"), default="at-once")
    parser.add_argument(
        "--pattern",
        choices=("stalls", "blocked"),
        default="stalls",
        help="stalls: pauses while reading; blocked: read nothing until the sender has been "
        "blocked for a second, then everything (test_a_client_reading_nothing_...)",
    )
    parser.add_argument(
        "--rcvbuf", type=int, default=0, help="SO_RCVBUF of the relay's sockets, KiB (0: auto)"
    )
    parser.add_argument("--read-size", type=int, default=256, help="KiB per recv (default 256)")
    parser.add_argument(
        "--threads", action="store_true", help="reader and sender as threads of this process"
    )
    parser.add_argument("--both", action="store_true", help="the same size the other way too")
    parser.add_argument("--stall-every", type=int, default=2048, help="KiB between pauses, mean")
    parser.add_argument("--stall-ms", type=float, default=20.0, help="longest pause (ms)")
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="append each run's record to this file")
    args = parser.parse_args()
    data = pattern(args.size * MB)
    path = kp.KernelPath(slots=64)
    loads = [child(busy) for _ in range(args.load)]
    failures = 0
    try:
        for i in range(args.runs):
            rec = one_run(i, data, path, args)
            failures += not rec["ok"]
            short = {k: rec[k] for k in ("run", "ok", "seconds", "reasons", "kernel")}
            down = rec["down"] or {}
            short["stale"] = (down.get("stale"), (rec["up"] or {}).get("stale"))
            short["user_down"] = down.get("user_bytes")
            res = rec["results"]
            short["retrans"] = [  # bytes TCP resent: backend -> relay, relay -> client
                res.get(side, {}).get("tcp", {}).get("bytes_retrans") for side in ("up", "down")
            ]
            print(json.dumps(short if rec["ok"] else rec), flush=True)
            if args.json is not None:
                with args.json.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
    finally:
        for pid in loads:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        path.close()
    print(f"failures {failures} of {args.runs} runs", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
