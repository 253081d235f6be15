"""Processes for the bench: start pinned to a core, wait for a port, stop by PID, read /proc.

Everything here reads Linux's /proc directly so the harness needs nothing beyond the standard
library: CPU time and RSS of a process tree, and per-core busy time from /proc/stat.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15.0
) -> None:
    """Wait until something accepts on 127.0.0.1:port (or the process dies)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            try:
                s.connect(("127.0.0.1", port))
                return
            except OSError:
                time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def pinned(core: int | None, argv: Sequence[str]) -> list[str]:
    """``argv`` run under ``taskset -c core`` (children inherit the affinity)."""
    if core is None:
        return list(argv)
    return ["taskset", "-c", str(core), *argv]


def start(
    argv: Sequence[str], core: int | None, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    out = open(log, "wb")  # noqa: SIM115 - the child keeps it; closed when we stop it
    try:
        return subprocess.Popen(pinned(core, argv), stdout=out, stderr=subprocess.STDOUT, env=env)
    finally:
        out.close()


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, by PID; the process is ours."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (nginx/haproxy master + workers, l4lb supervisor)."""
    kids = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def rss_kib(pids: Sequence[int]) -> int:
    """Sum of VmRSS over ``pids``, in KiB."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def cpu_split(pids: Sequence[int]) -> tuple[float, float]:
    """(user, system) CPU seconds used so far by ``pids``."""
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        user += int(fields[11])
        system += int(fields[12])
    return user / CLOCK_TICKS, system / CLOCK_TICKS


def core_times() -> dict[int, tuple[int, int]]:
    """Per core: (busy ticks, total ticks) from /proc/stat."""
    out: dict[int, tuple[int, int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                v = [int(x) for x in vals]
                idle = v[3] + v[4]  # idle + iowait
                total = sum(v[:8])  # guest time is already inside user
                out[int(name[3:])] = (total - idle, total)
    return out


@dataclass(slots=True)
class CpuWindow:
    """CPU use during one measurement: per-core busy fraction, and the balancer's own CPU."""

    balancer_pids: list[int]
    start_wall: float = 0.0
    start_cores: dict[int, tuple[int, int]] | None = None
    start_cpu: float = 0.0
    start_user: float = 0.0
    wall: float = 0.0
    cores: dict[int, float] = field(default_factory=dict)
    balancer_cpu: float = 0.0
    balancer_user: float = 0.0
    """The part of ``balancer_cpu`` spent in user space (the rest is the kernel's)."""
    machine_cpu: float = 0.0
    """Busy CPU seconds of every core (/proc/stat): balancer, generator, backend, softirq time
    wherever packets landed, and whatever else ran on the machine meanwhile."""

    def __enter__(self) -> CpuWindow:
        self.start_wall = time.monotonic()
        self.start_cores = core_times()
        self.start_user, system = cpu_split(self.balancer_pids)
        self.start_cpu = self.start_user + system
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.monotonic() - self.start_wall
        end = core_times()
        assert self.start_cores is not None
        self.cores = {
            c: (end[c][0] - self.start_cores[c][0]) / max(1, end[c][1] - self.start_cores[c][1])
            for c in end
            if c in self.start_cores
        }
        user, system = cpu_split(self.balancer_pids)
        self.balancer_cpu = user + system - self.start_cpu
        self.balancer_user = user - self.start_user
        self.machine_cpu = (
            sum(end[c][0] - self.start_cores[c][0] for c in end if c in self.start_cores)
            / CLOCK_TICKS
        )

    def summary(self, generator_core: int, ops: float | None = None) -> dict[str, object]:
        """Core use, balancer use (fraction of one core), and whether the generator was the limit.

        Load-generator-bound: the generator's core was saturated (≥ 90 % busy) while the
        balancer used less than 85 % of its core, so the figure understates the balancer.
        """
        util = self.balancer_cpu / self.wall if self.wall > 0 else 0.0
        gen = self.cores.get(generator_core, 0.0)
        out: dict[str, object] = {
            "core_busy": {str(c): round(v, 3) for c, v in sorted(self.cores.items())},
            "balancer_cpu": round(util, 3),
            "generator_bound": bool(self.balancer_pids) and gen >= 0.90 and util < 0.85,
        }
        if ops and self.balancer_pids:
            out["balancer_cpu_us_per_op"] = round(self.balancer_cpu / ops * 1e6, 2)
            out["balancer_user_us_per_op"] = round(self.balancer_user / ops * 1e6, 2)
        if ops:  # for direct too: the run without a balancer, subtracted in the table
            out["machine_cpu_us_per_op"] = round(self.machine_cpu / ops * 1e6, 2)
        return out


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until true or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True
