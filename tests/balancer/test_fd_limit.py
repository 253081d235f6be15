"""``l4lb run`` raises a low soft RLIMIT_NOFILE to what ``max_conns`` needs, or says it cannot."""

from __future__ import annotations

import contextlib
import hashlib
import resource
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.balancer.conftest import RELAY_MODES
from tests.balancer.helpers import backend, echo, hash_until_eof
from tests.support.l4lb import config_text
from tests.support.peers import free_port, stop_process, wait_for

CLIENTS = 150


def _run(workdir: Path, text: str, soft: int, hard: int) -> subprocess.Popen[bytes]:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "l4lb.toml").write_text(text)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    proc = subprocess.Popen(
        [sys.executable, "-m", "l4lb", "run", "--config", "l4lb.toml"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "l4lb.log", "wb"),  # noqa: SIM115
        preexec_fn=limit,
    )
    if not wait_for(lambda: "event=started" in (workdir / "l4lb.log").read_text(), 20):
        stop_process(proc)
        raise AssertionError((workdir / "l4lb.log").read_text())
    return proc


def _echoed(port: int, wait: float = 10.0) -> int:
    """CLIENTS connections open at once; how many got their byte back."""
    socks = []
    try:
        for _ in range(CLIENTS):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(b"x")
            except ConnectionResetError:
                # a connection the balancer had no descriptor for is reset; on a busy machine
                # the reset can land before connect() returns: not served, as a reset after it
                continue
            socks.append(s)
        ok = 0
        deadline = time.monotonic() + wait
        for s in socks:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            with contextlib.suppress(OSError):
                ok += s.recv(1) == b"x"
        return ok
    finally:
        for s in socks:
            s.close()


NEEDED = 664
"""Descriptors 300 connections need: 64 of the process's own + 2 sockets each."""
WANTED = {"stream": 664, "splice": 1864, "kernel": 1864}
"""And with a pipe each way while busy (splice, and kernel whose fallback is splice): + 4 each."""


@pytest.mark.parametrize("mode", RELAY_MODES)
def test_soft_limit_raised_and_every_connection_served(tmp_path: Path, mode: str) -> None:
    port = free_port()
    with backend(echo) as be:
        text = config_text(
            f"127.0.0.1:{port}", [be.address], top={"relay": mode}, listener={"max_conns": 300}
        )
        proc = _run(tmp_path, text, soft=128, hard=4096)
        try:
            assert _echoed(port) == CLIENTS  # 128 descriptors were not enough for 150 pairs
        finally:
            stop_process(proc)
    log = (tmp_path / "l4lb.log").read_text()
    want = WANTED[mode]
    assert f"event=fd_limit raised_from=128 to={want} needed={NEEDED} wanted={want}" in log, log
    assert "Traceback" not in log


@pytest.mark.parametrize("mode", RELAY_MODES)
def test_hard_limit_too_low_is_said_at_start_and_overflow_is_logged(
    tmp_path: Path, mode: str
) -> None:
    port = free_port()
    with backend(echo) as be:
        text = config_text(
            f"127.0.0.1:{port}", [be.address], top={"relay": mode}, listener={"max_conns": 300}
        )
        proc = _run(tmp_path, text, soft=128, hard=128)
        try:
            served = _echoed(port, wait=2.0)
            assert 0 < served < CLIENTS
            assert proc.poll() is None  # still running
        finally:
            stop_process(proc)
    log = (tmp_path / "l4lb.log").read_text()
    # (128 - 64) // 2 = 32 connections fit; max_conns is set, so it is a warning
    assert (
        f"level=warning logger=l4lb.run event=fd_limit limit=128 needed={NEEDED} connections_fit=32"
        in log
    ), log
    assert "LimitNOFILE" in log
    assert "Too many open files" in log  # each failure has its line
    assert "Traceback" not in log


def test_splice_out_of_pipe_descriptors_copies_instead_and_loses_nothing(tmp_path: Path) -> None:
    """Bug: each busy splice direction holds a pipe (two descriptors) that nothing budgeted;
    at EMFILE the pipe pool's OSError escaped the poller's dispatch (tracebacks, the rest of the
    edge-triggered batch dropped, connections stalled). Now the start-up check counts the pipes,
    and a direction with no pipe copies through userspace."""
    size = 4 << 20
    blob = bytes(range(256)) * (size // 256)
    digest = hashlib.sha256(blob).hexdigest()

    def handler(sock: socket.socket, header: object, early: bytes) -> None:
        sock.sendall(blob)  # blocks until the client reads
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(1 << 16):
            pass

    clients = 100
    port = free_port()
    with backend(handler) as be:
        text = config_text(
            f"127.0.0.1:{port}",
            [be.address],
            top={"relay": "splice"},
            listener={"max_conns": 108},
            access_log="off",
        )
        proc = _run(tmp_path, text, soft=300, hard=300)
        socks: list[socket.socket] = []
        try:
            for _ in range(clients):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # a slow reader
                s.settimeout(60)
                s.connect(("127.0.0.1", port))
                socks.append(s)
            # every backend is sending; the relay holds (or wanted) a pipe per connection
            assert wait_for(lambda: len(be.seen) >= clients, 30)
            assert wait_for(lambda: "event=pipe_unavailable" in _log(tmp_path), 30), _log(tmp_path)
            with ThreadPoolExecutor(max_workers=clients) as ex:
                got = list(ex.map(hash_until_eof, socks))
            assert proc.poll() is None
        finally:
            for s in socks:
                s.close()
            stop_process(proc)
    assert got == [(digest, size)] * clients
    log = _log(tmp_path)
    # the sockets fit (64 + 2 * 108 = 280), pipes for (300 - 280) // 2 = 10 busy directions
    assert (
        "level=info logger=l4lb.run event=fd_limit limit=300 needed=280 wanted=712 splice_pipes=10"
        in log
    ), log
    assert "level=warning logger=l4lb.run event=fd_limit" not in log, log
    assert "Traceback" not in log and "poller_handler_failed" not in log, log


def _log(workdir: Path) -> str:
    return (workdir / "l4lb.log").read_text(errors="replace")
