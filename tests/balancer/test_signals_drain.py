"""Signals during a graceful stop: nothing but SIGQUIT (or SIGKILL) cuts the drain short.

Transfers in flight must survive a second stop signal and a SIGHUP sent while the balancer drains
(logrotate, config management, systemd's control-group SIGTERM, Ctrl-C reaching every process of
the group), with one worker and with two. Each second signal is sent only once the first one has
been acted on (``event=stopping`` in the log), never after a sleep. The backends hold the rest of
every transfer until the test has sent all its signals (``release``), so the transfers are in
flight through all of them, whatever the machine's load.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.balancer.helpers import backend, connect, recv_all
from tests.support.l4lb import L4lb, config_text
from tests.support.peers import free_port, stop_process, wait_for

SIZE = 2 << 20
FIRST = 256 * 1024
DATA = random.Random(11).randbytes(SIZE)
DIGEST = hashlib.sha256(DATA).hexdigest()
CLIENTS = 20


def held(release: threading.Event) -> Callable[[socket.socket, object, bytes], None]:
    """A backend handler: the first FIRST bytes of DATA at once, the rest once ``release`` is
    set (or never: the balancer cut the connection), then the FIN."""

    def handler(sock: socket.socket, header: object, early: bytes) -> None:
        sock.sendall(DATA[:FIRST])
        if not release.wait(60):
            raise AssertionError("the test never released the transfer")
        sock.sendall(DATA[FIRST:])
        sock.shutdown(socket.SHUT_WR)
        recv_all(sock)

    return handler


@dataclass
class Draining:
    """A balancer with CLIENTS transfers under way, held by their backend until ``release``."""

    lb: L4lb
    transfers: list[Transfer]
    release: threading.Event


class Transfer(threading.Thread):
    """One client reading until EOF; ``started`` is set once the first bytes arrived."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.started = threading.Event()
        self.result: tuple[str, int] | None = None

    def run(self) -> None:
        h = hashlib.sha256()
        n = 0
        try:
            while True:
                chunk = self.sock.recv(1 << 18)
                if not chunk:
                    break
                self.started.set()
                h.update(chunk)
                n += len(chunk)
        except OSError:
            pass
        finally:
            self.started.set()
            self.sock.close()
        self.result = (h.hexdigest(), n)


def start(workdir: Path, text: str) -> L4lb:
    """``l4lb run`` in a session of its own, so the test can signal its whole process group."""
    path = workdir / "l4lb.toml"
    path.write_text(text)
    proc = subprocess.Popen(
        [sys.executable, "-m", "l4lb", "run", "--config", str(path)],
        cwd=workdir,
        stdout=open(workdir / "stdout.log", "wb"),  # noqa: SIM115
        stderr=open(workdir / "l4lb.log", "wb"),  # noqa: SIM115
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        start_new_session=True,
    )
    port = int(text.split('bind = "127.0.0.1:')[1].split('"')[0])
    return L4lb(proc, workdir, path, [("127.0.0.1", port)])


def children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(") ", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(name))
    return out


def worker_stops(lb: L4lb) -> int:
    """How many workers logged the start of their stop (the supervisor's line says workers=)."""
    return sum(
        1
        for line in lb.log_text().splitlines()
        if "event=stopping" in line and "workers=" not in line
    )


@pytest.fixture
def balancer(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Draining]:
    """A balancer (``workers`` from the test's parameter) with CLIENTS transfers under way."""
    workers: int = request.param
    port = free_port()
    release = threading.Event()
    with backend(held(release)) as be:
        text = config_text(
            f"127.0.0.1:{port}",
            [be.address],
            top={"workers": workers, "drain_timeout": "60s"},
        )
        lb = start(tmp_path, text)
        try:
            assert wait_for(lambda: lb.log_text().count("event=started") == workers, 20), (
                lb.log_text()
            )
            transfers = [Transfer(connect(port, f"127.0.0.{10 + i}")) for i in range(CLIENTS)]
            for t in transfers:
                t.start()
            for t in transfers:
                assert t.started.wait(20)
            yield Draining(lb, transfers, release)
        finally:
            release.set()
            stop_process(lb.proc, timeout=5)


def _intact(running: Draining) -> None:
    """Every signal was sent with the transfers held: the balancer still drains; release them,
    and each arrives whole before the balancer exits 0."""
    lb, transfers = running.lb, running.transfers
    assert lb.proc.poll() is None, lb.log_text()
    running.release.set()
    assert lb.proc.wait(90) == 0, lb.log_text()
    for t in transfers:
        t.join(30)
    got = [t.result for t in transfers]
    assert got == [(DIGEST, SIZE)] * CLIENTS, lb.log_text()
    lines = [x for x in lb.access_lines() if x["event"] == "connection"]
    assert len(lines) == CLIENTS
    assert {x["end"] for x in lines} == {"backend_closed"}
    assert sum(x["bytes_to_client"] for x in lines) == SIZE * CLIENTS


@pytest.mark.parametrize("balancer", [1, 2], indirect=True)
def test_sighup_and_a_second_sigterm_during_the_drain_cut_nothing(
    balancer: Draining,
) -> None:
    """With workers the supervisor takes the later signals: it forwards none of them."""
    lb = balancer.lb
    workers = len(children(lb.pid))
    lb.proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: worker_stops(lb) == max(workers, 1), 20)
    lb.proc.send_signal(signal.SIGHUP)  # logrotate's postrotate
    assert wait_for(lambda: "event=reload_ignored" in lb.log_text(), 20), lb.log_text()
    lb.proc.send_signal(signal.SIGTERM)  # a supervisor's forwarded stop
    lb.proc.send_signal(signal.SIGINT)
    assert wait_for(lambda: lb.log_text().count("event=stop_signal_repeated") == 2, 20)
    _intact(balancer)


@pytest.mark.parametrize("balancer", [2], indirect=True)
def test_ctrl_c_to_the_process_group_drains_every_worker(
    balancer: Draining,
) -> None:
    lb = balancer.lb
    os.killpg(lb.pid, signal.SIGINT)  # the terminal's Ctrl-C: supervisor and workers at once
    assert wait_for(lambda: worker_stops(lb) == 2, 20), lb.log_text()
    _intact(balancer)
    assert "event=stop_signal_repeated" in lb.log_text()  # the supervisor's forward, ignored


@pytest.mark.parametrize("balancer", [2], indirect=True)
def test_a_control_group_sigterm_reaching_the_workers_first_drains(
    balancer: Draining,
) -> None:
    lb = balancer.lb
    workers = children(lb.pid)
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    assert wait_for(lambda: worker_stops(lb) == 2, 20), lb.log_text()
    lb.proc.send_signal(signal.SIGTERM)  # systemd's signal to the main process, a bit later
    _intact(balancer)


@pytest.mark.parametrize("balancer", [1, 2], indirect=True)
def test_sigquit_during_the_drain_closes_everything_at_once(
    balancer: Draining,
) -> None:
    lb = balancer.lb
    lb.proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: "event=stopping" in lb.log_text(), 20)
    lb.proc.send_signal(signal.SIGQUIT)  # drain_timeout is 60 s: only SIGQUIT ends it sooner
    assert lb.proc.wait(30) == 0, lb.log_text()
    for t in balancer.transfers:
        t.join(30)
    assert all(t.result is not None and t.result[1] < SIZE for t in balancer.transfers)
    lines = [x for x in lb.access_lines() if x["event"] == "connection"]
    assert len(lines) == CLIENTS
    assert {x["end"] for x in lines} == {"shutdown"}
    assert "event=stop_now signal=SIGQUIT" in lb.log_text()


def test_a_sighup_that_arrives_while_a_worker_starts_is_replayed_not_lost() -> None:
    """A new worker remembers a forwarded SIGHUP until its handlers are in, then reloads."""
    import asyncio

    from l4lb.balancer import signals

    async def main() -> list[str]:
        calls: list[str] = []
        loop = asyncio.get_running_loop()
        previous = signal.signal(signal.SIGHUP, signals.remember)
        try:
            os.kill(os.getpid(), signal.SIGHUP)  # before the handlers: remembered
            stop = signals.StopSignals(loop, lambda: calls.append("reload"), lambda: None)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            return [*calls, stop.mode.value]
        finally:
            for sig in (*signals.GRACEFUL, signals.IMMEDIATE, signal.SIGHUP, *signals.IGNORED):
                loop.remove_signal_handler(sig)
            signal.signal(signal.SIGHUP, previous)

    assert asyncio.run(main()) == ["reload", "running"]


@pytest.mark.parametrize("workers", [1, 2])
def test_sigusr2_reopens_logs_and_sigusr1_stops_gracefully(tmp_path: Path, workers: int) -> None:
    """Their default action kills: SIGUSR2 reopens the access log (and nothing else; the
    supervisor forwards it to the workers), SIGUSR1 is HAProxy's soft-stop."""
    port = free_port()
    release = threading.Event()
    with backend(held(release)) as be:
        text = config_text(f"127.0.0.1:{port}", [be.address], top={"workers": workers})
        lb = start(tmp_path, text)
        try:
            assert wait_for(lambda: lb.log_text().count("event=started") == workers, 20)
            os.killpg(lb.pid, signal.SIGUSR2)  # every process of the group gets it
            assert wait_for(
                lambda: lb.log_text().count("event=reopen_logs signal=SIGUSR2") >= workers,
                20,
            ), lb.log_text()
            assert lb.proc.poll() is None
            transfer = Transfer(connect(port))
            transfer.start()
            assert transfer.started.wait(20)
            lb.proc.send_signal(signal.SIGUSR1)
            lb.wait_log("event=stopping signal=SIGUSR1", timeout=20)
            assert lb.proc.poll() is None  # a soft stop: the transfer is still held
            release.set()
            assert lb.proc.wait(60) == 0, lb.log_text()
            transfer.join(30)
            assert transfer.result == (DIGEST, SIZE)
        finally:
            release.set()
            stop_process(lb.proc, timeout=5)
