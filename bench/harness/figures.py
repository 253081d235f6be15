"""The figures: each measures one contender once and returns a dict for the JSON results.

Every load generator runs pinned to the generator core; CPU use of both cores and of the
balancer's processes is sampled around each measurement (see :class:`procs.CpuWindow`).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import procs
from harness.contenders import Contender

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True, slots=True)
class Settings:
    generator_core: int | None = 0
    balancer_core: int | None = 1
    wrk_seconds: float = 2.0
    wrk_connections: int = 32
    bulk_bytes: int = 512 << 20
    """Bytes of the large file one stream reads (the whole file by default)."""
    bulk_many_bytes: int = 128 << 20
    """Bytes each of the parallel streams reads (a range of the file)."""
    bulk_streams: int = 8
    paced_rate: float = 1000.0
    paced_seconds: float = 2.0
    hold_count: int = 9000
    warmup_seconds: float = 0.5


Figure = Callable[[Contender, Settings], dict[str, object]]

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return round(float(m.group(1)) * _UNITS[m.group(2)], 3)


def parse_wrk(out: str) -> dict[str, object]:
    """Requests/sec, latency percentiles and errors from ``wrk --latency`` output."""
    res: dict[str, object] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"wrk gave no rate: {out.strip()[-400:]}")
    res["rate"] = round(float(m.group(1)), 1)
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        if m:
            res[f"p{pct}_ms"] = _ms(m.group(1))
    m = re.search(r"(\d+) requests in", out)
    res["requests"] = int(m.group(1)) if m else 0
    errs = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        # a read "error" on Connection: close is the server's FIN and not a failure; count the rest
        errs += int(m.group(1)) + int(m.group(3)) + int(m.group(4))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errs += int(m.group(1))
    res["errors"] = errs
    return res


def _wrk(c: Contender, s: Settings, seconds: float, close: bool) -> dict[str, object]:
    argv = [
        "wrk",
        "-t1",
        f"-c{s.wrk_connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "5s",
    ]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{c.port}/tiny")
    return parse_wrk(
        subprocess.run(
            procs.pinned(s.generator_core, argv), capture_output=True, text=True, check=True
        ).stdout
    )


def _wrk_figure(close: bool) -> Figure:
    def figure(c: Contender, s: Settings) -> dict[str, object]:
        if s.warmup_seconds:
            _wrk(c, s, s.warmup_seconds, close)
        with procs.CpuWindow(c.pids()) as cpu:
            res = _wrk(c, s, s.wrk_seconds, close)
        res.update(cpu.summary(_core(s), float(res["requests"])))  # type: ignore[arg-type]
        return res

    return figure


def _core(s: Settings) -> int:
    return s.generator_core if s.generator_core is not None else -1


new_connections = _wrk_figure(close=True)
"""One request per connection (wrk, ``Connection: close``): rate, p50/p99."""

keepalive = _wrk_figure(close=False)
"""Requests over kept-alive connections (wrk): rate, p50/p99."""


def _bulk(c: Contender, s: Settings, streams: int, size: int) -> dict[str, object]:
    argv = [
        "curl", "-s", "-o", "/dev/null", "-w", "%{size_download} %{http_code}\\n",
        "-r", f"0-{size - 1}", f"http://127.0.0.1:{c.port}/big.bin",
    ]  # fmt: skip
    with procs.CpuWindow(c.pids()) as cpu:
        t = time.monotonic()
        runs = [
            subprocess.Popen(
                procs.pinned(s.generator_core, argv), stdout=subprocess.PIPE, text=True
            )
            for _ in range(streams)
        ]
        outs = [p.communicate()[0] for p in runs]
        wall = time.monotonic() - t
    total = 0
    errors = 0
    for out in outs:
        got, code = out.split()
        total += int(got)
        errors += code not in ("200", "206") or int(got) != size
    res: dict[str, object] = {
        "mb_per_s": round(total / wall / 1e6, 1),
        "bytes": total,
        "wall_s": round(wall, 3),
        "errors": errors,
    }
    res.update(cpu.summary(_core(s)))
    if c.pids():
        res["balancer_cpu_s_per_gb"] = round(cpu.balancer_cpu / (total / 1e9), 3)
    if total:
        res["machine_cpu_s_per_gb"] = round(cpu.machine_cpu / (total / 1e9), 3)
    return res


def bulk_one(c: Contender, s: Settings) -> dict[str, object]:
    """MB/s (10^6 bytes/s) for one stream of the large file (curl, discarding)."""
    return _bulk(c, s, 1, s.bulk_bytes)


def bulk_many(c: Contender, s: Settings) -> dict[str, object]:
    """Aggregate MB/s for ``bulk_streams`` parallel streams of the large file."""
    return _bulk(c, s, s.bulk_streams, s.bulk_many_bytes)


def paced(c: Contender, s: Settings) -> dict[str, object]:
    """Latency at a fixed moderate rate of new connections (open loop, see paced.py)."""
    argv = [
        sys.executable, str(HERE / "paced.py"), "--port", str(c.port),
        "--rate", str(s.paced_rate), "--duration", str(s.paced_seconds),
    ]  # fmt: skip
    with procs.CpuWindow(c.pids()) as cpu:
        out = subprocess.run(
            procs.pinned(s.generator_core, argv), capture_output=True, text=True, check=True
        ).stdout
    res: dict[str, object] = json.loads(out)
    res.update(cpu.summary(_core(s)))
    return res


def _established(port: int) -> int:
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(1 for line in out.splitlines() if line.strip())


def idle_memory(c: Contender, s: Settings) -> dict[str, object]:
    """Balancer RSS per idle proxied connection: hold N open from another process, RSS delta / N.

    RSS is the sum of VmRSS over the balancer's process tree (master + workers).
    """
    pids = c.pids()
    if not pids:
        return {"skipped": "no balancer process"}
    backend_port = c.backend.proxy_port
    procs.wait_until(lambda: _established(backend_port) == 0, 20)
    time.sleep(0.3)
    before = procs.rss_kib(c.pids())
    argv = [
        sys.executable, str(HERE / "hold.py"), "--port", str(c.port), "--count", str(s.hold_count),
    ]  # fmt: skip
    holder = subprocess.Popen(
        procs.pinned(s.generator_core, argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        line = holder.stdout.readline()
        if not line:
            raise RuntimeError("the holder exited before reporting")
        report = json.loads(line)
        opened = int(report["open"])
        procs.wait_until(lambda: _established(backend_port) >= opened, 20)
        through = _established(backend_port)
        time.sleep(0.5)
        after = procs.rss_kib(c.pids())
        holder.stdin.write("close\n")
        holder.stdin.flush()
        holder.wait(30)
    finally:
        procs.stop(holder)
    procs.wait_until(lambda: _established(backend_port) == 0, 20)
    res: dict[str, object] = {
        "connections": opened,
        "backend_connections": through,
        "errors": int(report["errors"]),
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_conn": round((after - before) / max(1, opened), 3),
    }
    if report["first_error"]:
        res["first_error"] = report["first_error"][0]
    return res


MEASUREMENTS: dict[str, Figure] = {
    "newconn": new_connections,
    "keepalive": keepalive,
    "bulk1": bulk_one,
    "bulk8": bulk_many,
    "paced": paced,
    "idle": idle_memory,
}
"""Run in this order; within each, every contender in turn (alternating, same run)."""

ROWS: list[tuple[str, str, str, bool]] = [
    # (table label, measurement, value key, higher is better)
    ("new conn/s (1 req per conn, wrk)", "newconn", "rate", True),
    ("  its p50 ms", "newconn", "p50_ms", False),
    ("  its p99 ms", "newconn", "p99_ms", False),
    ("keep-alive req/s (wrk)", "keepalive", "rate", True),
    ("bulk MB/s, 1 stream", "bulk1", "mb_per_s", True),
    ("bulk MB/s, 8 streams", "bulk8", "mb_per_s", True),
    ("p50 ms at fixed rate (paced)", "paced", "p50_ms", False),
    ("p99 ms at fixed rate (paced)", "paced", "p99_ms", False),
    ("  the generator's own lag, p99 ms", "paced", "lag_p99_ms", False),
    ("  p99 ms from each request's connect() (its lag out)", "paced", "p99_from_connect_ms", False),
    ("RSS KiB per idle connection", "idle", "kib_per_conn", False),
    ("balancer CPU us per new conn", "newconn", "balancer_cpu_us_per_op", False),
    ("  of which user space", "newconn", "balancer_user_us_per_op", False),
    ("balancer CPU us per keep-alive req", "keepalive", "balancer_cpu_us_per_op", False),
    ("  of which user space", "keepalive", "balancer_user_us_per_op", False),
    ("balancer CPU s per GB (1 stream)", "bulk1", "balancer_cpu_s_per_gb", False),
    ("balancer CPU s per GB (8 streams)", "bulk8", "balancer_cpu_s_per_gb", False),
    # All cores (/proc/stat), every contender and direct too, then minus direct's
    ("machine CPU us per new conn", "newconn", "machine_cpu_us_per_op", False),
    ("machine CPU us per keep-alive req", "keepalive", "machine_cpu_us_per_op", False),
    ("machine CPU s per GB (1 stream)", "bulk1", "machine_cpu_s_per_gb", False),
    ("machine CPU s per GB (8 streams)", "bulk8", "machine_cpu_s_per_gb", False),
    ("machine CPU us per new conn, minus direct", "newconn", "machine_cpu_us_per_op_net", False),
    (
        "machine CPU us per keep-alive req, - direct",
        "keepalive",
        "machine_cpu_us_per_op_net",
        False,
    ),
    ("machine CPU s per GB (1 stream), - direct", "bulk1", "machine_cpu_s_per_gb_net", False),
    ("machine CPU s per GB (8 streams), - direct", "bulk8", "machine_cpu_s_per_gb_net", False),
]

NO_BALANCER = "direct"
_NET = {
    "newconn": "machine_cpu_us_per_op",
    "keepalive": "machine_cpu_us_per_op",
    "bulk8": "machine_cpu_s_per_gb",
    "bulk1": "machine_cpu_s_per_gb",
}


def add_machine_net(results: dict[str, dict[str, Any]]) -> None:
    """Each contender's machine-wide CPU per operation minus the no-balancer run's (``direct``).

    All cores, from /proc/stat: with a kernel data path the work leaves the balancer's process
    for softirq time on whichever core the packets arrive, which per-process CPU does not see.
    What remains after subtracting ``direct`` is what the balancer added, wherever it ran (on a
    shared machine, plus whatever else ran during the figure: compare within one run only).
    """
    base = results.get(NO_BALANCER, {})
    for name, figures in results.items():
        if name == NO_BALANCER:
            continue
        for measurement, key in _NET.items():
            res, ref = figures.get(measurement), base.get(measurement)
            if not isinstance(res, dict) or not isinstance(ref, dict):
                continue
            if isinstance(res.get(key), (int, float)) and isinstance(ref.get(key), (int, float)):
                res[f"{key}_net"] = round(float(res[key]) - float(ref[key]), 3)


SINGLE_ROUND = {"idle"}
"""Measurements taken once even with several rounds (holding 9,000 connections is slow)."""


def merge_rounds(rounds: list[dict[str, object]]) -> dict[str, object]:
    """One result from several rounds: the median of every number, errors summed.

    A round disturbed by other work on the machine moves the median less than the mean; the
    raw rounds stay in the JSON under ``rounds``.
    """
    if len(rounds) == 1:
        return rounds[0]
    ok = [r for r in rounds if "failed" not in r]
    if not ok:
        return rounds[-1]
    out: dict[str, object] = {}
    for key, value in ok[0].items():
        values = [r.get(key) for r in ok]
        if key == "errors":
            out[key] = sum(int(v) for v in values if isinstance(v, int))
        elif isinstance(value, bool):
            out[key] = sum(bool(v) for v in values) * 2 > len(values)
        elif isinstance(value, int | float):
            nums = sorted(float(v) for v in values if isinstance(v, int | float))
            mid = (
                nums[len(nums) // 2]
                if len(nums) % 2
                else (nums[len(nums) // 2 - 1] + nums[len(nums) // 2]) / 2
            )
            out[key] = round(mid, 3)
        else:
            out[key] = value
    out["rounds"] = rounds
    return out
