"""``workers = 2`` end to end: the real ``l4lb run`` supervising two worker processes.

Per-client limits hold across workers (each client is steered to one worker), a crashed worker is
replaced, and SIGTERM stops everything with exit code 0.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.balancer.helpers import backend, connect, hash_until_eof, hello, recv_all
from tests.support.l4lb import config_text, l4lb
from tests.support.peers import free_port, wait_for


def _children(pid: int) -> set[int]:
    out = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(") ", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.add(int(name))
    return out


def _served(sock: socket.socket) -> bool:
    """True if the backend's greeting comes through (the balancer let the connection in)."""
    sock.settimeout(10)
    try:
        return sock.recv(100).startswith(b"client=")
    except OSError:
        return False


def _attempt(source: str, port: int) -> bool:
    with connect(port, source) as s:
        return _served(s)


def test_per_client_limits_hold_across_workers(tmp_path: Path) -> None:
    port = free_port()
    with backend(hello) as be:
        text = config_text(
            f"127.0.0.1:{port}",
            [be.address],
            top={"workers": 2},
            listener={"max_conns_per_client": 2},
        )
        with l4lb(tmp_path, text) as lb:
            assert wait_for(lambda: lb.log_text().count("event=started") == 2, 10)
            assert len(_children(lb.pid)) == 2
            held: list[socket.socket] = []
            try:
                # were the workers counting separately, a third connection would often get in
                for i in range(20, 30):
                    ip = f"127.0.0.{i}"
                    pair = [connect(port, ip) for _ in range(2)]
                    held += pair
                    assert all(_served(s) for s in pair), lb.log_text()
                    assert not _attempt(ip, port), f"{ip}: a third connection got in"
            finally:
                for s in held:
                    s.close()
            lines = lb.wait_access(30)
            refused = [x for x in lines if x["event"] == "rejected"]
            assert len(refused) == 10
            assert {x["reason"] for x in refused} == {"over_conn_limit"}


def test_a_crashed_worker_is_replaced_and_sigterm_stops_all(tmp_path: Path) -> None:
    port = free_port()
    with backend(hello) as be:
        text = config_text(f"127.0.0.1:{port}", [be.address], top={"workers": 2})
        with l4lb(tmp_path, text) as lb:
            assert wait_for(lambda: lb.log_text().count("event=started") == 2, 10)
            first = _children(lb.pid)
            assert len(first) == 2
            victim = min(first)
            os.kill(victim, signal.SIGKILL)
            assert wait_for(lambda: "event=worker_crashed" in lb.log_text(), 10)
            assert wait_for(lambda: len(_children(lb.pid) - first) == 1, 10), lb.log_text()
            assert wait_for(lambda: lb.log_text().count("event=started") == 3, 10)
            # every client is served again, whichever worker it is steered to
            assert all(_attempt(f"127.0.0.{i}", port) for i in range(40, 50))
            workers = _children(lb.pid)
            assert lb.stop() == 0
            assert not any(_children(lb.pid)) and all(
                not os.path.exists(f"/proc/{p}") or _zombie_or_gone(p) for p in workers
            )
            assert "event=stopping signal=SIGTERM" in lb.log_text()


def _zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].startswith("Z")
    except OSError:
        return True


@pytest.mark.parametrize("relay", ["stream", "splice"])
def test_sigterm_lets_every_workers_transfers_finish(tmp_path: Path, relay: str) -> None:
    size = 8 << 20
    data = random.Random(5).randbytes(size)

    def handler(sock: socket.socket, header: object, early: bytes) -> None:
        view = memoryview(data)
        for i in range(0, size, 256 * 1024):  # paced: about 1.5 s per transfer
            sock.sendall(view[i : i + 256 * 1024])
            time.sleep(0.05)
        sock.shutdown(socket.SHUT_WR)
        recv_all(sock)

    port = free_port()
    results: list[tuple[str, int]] = []
    with backend(handler) as be:
        text = config_text(f"127.0.0.1:{port}", [be.address], top={"workers": 2, "relay": relay})
        with l4lb(tmp_path, text) as lb:
            assert wait_for(lambda: lb.log_text().count("event=started") == 2, 10)
            # each worker says its relay (the parent's workers_started line may say it too)
            assert lb.log_text().count(f"event=started relay={relay}") == 2
            # clients on both workers (steering spreads these addresses over the two)
            clients = [connect(port, f"127.0.0.{i}") for i in range(60, 66)]
            threads = [
                threading.Thread(target=lambda c=c: results.append(hash_until_eof(c)))
                for c in clients
            ]
            for t in threads:
                t.start()
            assert wait_for(lambda: len(be.seen) == len(clients))  # every transfer has started
            assert lb.stop(30) == 0
            for t in threads:
                t.join(30)
            assert results == [(hashlib.sha256(data).hexdigest(), size)] * len(clients)
            busy = {line["client"].split(":")[0] for line in lb.wait_access(len(clients))}
            assert len(busy) == len(clients)
            assert lb.log_text().count("event=draining") == 2  # both workers drained


def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    """A supervisor killed with SIGKILL leaves no worker holding the port."""
    port = free_port()
    with backend(hello) as be:
        text = config_text(f"127.0.0.1:{port}", [be.address], top={"workers": 2})
        with l4lb(tmp_path, text) as lb:
            assert wait_for(lambda: lb.log_text().count("event=started") == 2, 10)
            workers = _children(lb.pid)
            assert len(workers) == 2
            os.kill(lb.pid, signal.SIGKILL)
            try:
                gone = wait_for(lambda: all(_zombie_or_gone(p) for p in workers), 15)
                assert gone, lb.log_text()
                with socket.socket() as probe:
                    probe.settimeout(5)
                    assert probe.connect_ex(("127.0.0.1", port)) != 0, "a worker still serves"
            finally:  # never leave an orphan behind, even when the test fails
                for p in workers:
                    if not _zombie_or_gone(p):
                        os.kill(p, signal.SIGKILL)
