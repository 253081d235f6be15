"""The worker supervisor and the reuseport steering, over real sockets and real processes.

The supervisor runs in a subprocess of its own (it forks, and owns signals) with a tiny worker
that answers every connection with ``index pid reloads``; the tests kill, signal and query it.
The steering program is also checked on its own against a plain reuseport group.
"""

from __future__ import annotations

import collections
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from l4lb.balancer.workers import attach_steering, steering_program
from tests.support.peers import free_port, stop_process, wait_for, wait_port

WORKER_SCRIPT = textwrap.dedent(
    """
    import os, signal, socket, sys, time
    from types import SimpleNamespace as NS
    from l4lb.balancer import logs, workers

    port, count, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    listener = NS(name="t", bind=f"127.0.0.1:{port}", bind_addr=("127.0.0.1", port),
                  client_v6_prefix=64)
    config = NS(workers=count, drain_timeout_s=2.0, listeners=[listener])

    def run_worker(path, cfg, index):
        if mode == "fail":
            print("worker cannot start", file=sys.stderr)
            return 1
        if mode == "slow":  # like the real balancer: imports and config before its handlers
            time.sleep(0.5)
        sock = workers.inherited_socket(("127.0.0.1", port))
        assert sock is not None
        sock.setblocking(True)
        state = {"hups": 0, "stop": False}
        def hup(*_):
            state["hups"] += 1
        def term(*_):
            state["stop"] = True
        signal.signal(signal.SIGHUP, hup)
        signal.signal(signal.SIGTERM, term)
        sock.settimeout(0.1)
        while not state["stop"]:
            try:
                conn, _ = sock.accept()
            except (TimeoutError, InterruptedError):
                continue
            with conn:
                conn.sendall(f"{index} {os.getpid()} {state['hups']}\\n".encode())
        return 0

    logs.setup_logging()
    sys.exit(workers.Supervisor("unused.toml", config, run_worker).run())
    """
)


class Supervised:
    def __init__(self, tmp: Path, count: int, mode: str = "serve", port: int = 0) -> None:
        self.port = port or free_port()
        script = tmp / "supervise.py"
        script.write_text(WORKER_SCRIPT)
        self.log = tmp / "supervisor.log"
        self._out = open(self.log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(self.port), str(count), mode],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )

    def ask(self, source: str = "127.0.0.1") -> tuple[int, int, int]:
        with socket.socket() as s:
            s.settimeout(10)
            s.bind((source, 0))
            s.connect(("127.0.0.1", self.port))
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(100)
                assert chunk, "worker closed without answering"
                data += chunk
        index, pid, hups = data.split()
        return int(index), int(pid), int(hups)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        stop_process(self.proc, timeout=15)
        self._out.close()


@pytest.fixture
def two(tmp_path: Path) -> Iterator[Supervised]:
    sup = Supervised(tmp_path, 2)
    try:
        wait_port("127.0.0.1", sup.port, proc=sup.proc)
        # The supervisor listens before it forks, so the port accepts before the workers run.
        # Wait until each worker has answered once, i.e. has its signal handlers: a SIGHUP sent
        # earlier found a worker with the default action, killed it, and its replacement
        # reported 0 reloads (seen under load).
        seen: set[int] = set()
        deadline = time.monotonic() + 30
        while len(seen) < 2:
            assert time.monotonic() < deadline, f"workers answering: {seen}\n{sup.text()}"
            seen |= {sup.ask(f"127.0.0.{i}")[0] for i in range(2, 14)}
        yield sup
    finally:
        sup.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


def test_each_client_always_reaches_the_same_worker(two: Supervised) -> None:
    seen: dict[str, set[int]] = collections.defaultdict(set)
    for i in range(2, 14):
        ip = f"127.0.0.{i}"
        for _ in range(4):
            seen[ip].add(two.ask(ip)[0])
    assert all(len(workers) == 1 for workers in seen.values()), seen
    assert set().union(*seen.values()) == {0, 1}  # and both workers get clients


def test_a_killed_worker_is_restarted_in_its_place(two: Supervised) -> None:
    index, pid, _ = two.ask("127.0.0.2")
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: "event=worker_crashed" in two.text(), 10), two.text()
    assert "signal=SIGKILL" in two.text()
    # the same client reaches the replacement: same index, new pid
    assert wait_for(lambda: two.ask("127.0.0.2")[1] != pid, 15)
    new_index, new_pid, _ = two.ask("127.0.0.2")
    assert new_index == index and new_pid != pid
    assert two.proc.poll() is None


def test_sighup_is_forwarded_to_every_worker(two: Supervised) -> None:
    two.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "event=reload_forwarded" in two.text(), 10)
    got = {}
    for i in range(2, 14):
        index, _, hups = two.ask(f"127.0.0.{i}")
        got[index] = hups
    assert got == {0: 1, 1: 1}


def test_sigterm_stops_all_workers_and_exits_zero(two: Supervised) -> None:
    pids = {two.ask(f"127.0.0.{i}")[1] for i in range(2, 14)}
    assert len(pids) == 2
    two.proc.send_signal(signal.SIGTERM)
    assert two.proc.wait(15) == 0
    assert not any(_alive(p) for p in pids)
    assert "event=stopping signal=SIGTERM" in two.text()
    with socket.socket() as s, pytest.raises(OSError):
        s.settimeout(2)
        s.connect(("127.0.0.1", two.port))


def test_a_worker_that_cannot_start_stops_everything(tmp_path: Path) -> None:
    sup = Supervised(tmp_path, 2, mode="fail")
    try:
        assert sup.proc.wait(15) == 1
        assert "event=worker_start_failed" in sup.text()
    finally:
        sup.close()


def test_a_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        sup = Supervised(tmp_path, 2, port=taken.getsockname()[1])
        try:
            assert sup.proc.wait(15) == 1
        finally:
            sup.close()
        assert "event=start_failed" in sup.text()
        assert f"cannot bind 127.0.0.1:{sup.port}" in sup.text()
        assert "Traceback" not in sup.text()


@pytest.mark.parametrize("count", [2, 3])
def test_steering_program_picks_one_socket_per_client_address(count: int) -> None:
    group: list[socket.socket] = []
    try:
        port = 0
        for _ in range(count):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", port))
            port = s.getsockname()[1]
            s.listen(64)
            group.append(s)
        attach_steering(group[0], steering_program(count))
        seen: dict[int, set[int]] = collections.defaultdict(set)
        for ip in range(2, 26):
            for _ in range(3):
                with socket.socket() as c:
                    c.bind((f"127.0.0.{ip}", 0))
                    c.connect(("127.0.0.1", port))
                    ready, _, _ = select.select(group, [], [], 5)
                    assert len(ready) == 1
                    accepted, _ = ready[0].accept()
                    accepted.close()
                    seen[ip].add(group.index(ready[0]))
        assert all(len(v) == 1 for v in seen.values()), seen
        assert set().union(*seen.values()) == set(range(count))
    finally:
        for s in group:
            s.close()


def test_steering_program_masks_ipv6_to_the_limiter_prefix() -> None:
    # prefix /48: the second word of the address keeps only its top 16 bits
    prog = steering_program(4, v6_prefix=48)
    ands = [k for code, _, _, k in prog if code == 0x54]
    assert ands == [0xFFFFFFFF, 0xFFFF0000]
    assert [k for code, _, _, k in steering_program(4, v6_prefix=24) if code == 0x54] == [
        0xFFFFFF00,
        0,
    ]
    assert [k for code, _, _, k in steering_program(4, v6_prefix=128) if code == 0x54] == [
        0xFFFFFFFF,
        0xFFFFFFFF,
    ]


def test_steering_works_for_ipv6_listeners() -> None:
    group: list[socket.socket] = []
    try:
        port = 0
        for _ in range(2):
            s = socket.socket(socket.AF_INET6)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("::1", port))
            port = s.getsockname()[1]
            s.listen(64)
            group.append(s)
        attach_steering(group[0], steering_program(2))
        seen = set()
        for _ in range(12):
            with socket.socket(socket.AF_INET6) as c:
                c.connect(("::1", port))
                ready, _, _ = select.select(group, [], [], 5)
                accepted, _ = ready[0].accept()
                accepted.close()
                seen.add(group.index(ready[0]))
        assert len(seen) == 1  # one client address, one socket
    finally:
        for s in group:
            s.close()


def test_a_reload_during_worker_start_does_not_kill_it(tmp_path: Path) -> None:
    sup = Supervised(tmp_path, 2, mode="slow")
    try:
        # SIGHUPs while the workers are still starting (before their own handlers exist)
        assert wait_for(lambda: "event=worker_started index=1" in sup.text(), 10)
        for _ in range(5):
            sup.proc.send_signal(signal.SIGHUP)
            time.sleep(0.002)
        wait_port("127.0.0.1", sup.port, proc=sup.proc)
        assert {sup.ask(f"127.0.0.{i}")[0] for i in range(2, 14)} == {0, 1}
        assert "event=worker_crashed" not in sup.text(), sup.text()
    finally:
        sup.close()
