"""Server options through a running ``l4lb run``, with real sockets: backup, slowstart,
TCP keepalive on both sides (seen with ``ss``), client_timeout and server_timeout."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from l4lb.proxy_protocol import ProxyHeader
from tests.balancer.conftest import RELAY_MODES
from tests.balancer.helpers import backend, recv_all
from tests.support.l4lb import config_text, l4lb
from tests.support.peers import free_port, wait_for

TOKEN = "t0ken-server-options"


def _named(name: bytes) -> Any:
    def handler(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
        sock.sendall(name)

    return handler


def _who(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.settimeout(10)
        return recv_all(s).decode()


def _admin(admin: int, path: str, post: bool = False) -> Any:
    req = urllib.request.Request(
        f"http://127.0.0.1:{admin}{path}",
        method="POST" if post else "GET",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def _backends(admin: int) -> dict[str, dict[str, Any]]:
    pool = _admin(admin, "/status")["pools"][0]
    return {b["address"]: b for b in pool["backends"]}


def _with_admin(text: str, admin: int) -> str:
    return text + f'\n[admin]\nbind = "127.0.0.1:{admin}"\ntoken = "{TOKEN}"\n'


def test_the_backup_serves_only_when_the_primary_is_down(tmp_path: Path) -> None:
    admin = free_port()
    with backend(_named(b"primary")) as primary, backend(_named(b"backup")) as spare:
        text = config_text(
            f"127.0.0.1:{free_port()}",
            [primary.address, {"address": spare.address, "backup": True}],
            health={"check": "tcp", "interval": "100ms", "rise": 1, "fall": 1},
        )
        with l4lb(tmp_path, _with_admin(text, admin)) as lb:
            assert Counter(_who(lb.port) for _ in range(10)) == {"primary": 10}
            primary.close()  # the primary's port now refuses: its check fails
            assert wait_for(lambda: _backends(admin)[primary.address]["state"] == "down")
            assert Counter(_who(lb.port) for _ in range(10)) == {"backup": 10}
            assert _backends(admin)[spare.address]["backup"] is True


def test_slowstart_gives_a_returning_backend_a_small_share(tmp_path: Path) -> None:
    admin = free_port()
    with backend(_named(b"a")) as a, backend(_named(b"b")) as b:
        text = config_text(
            f"127.0.0.1:{free_port()}",
            [
                {"address": a.address, "weight": 100},
                {"address": b.address, "weight": 100, "slowstart": "1h"},
            ],
        )
        with l4lb(tmp_path, _with_admin(text, admin)) as lb:
            # At start no slow start: an even split.
            assert Counter(_who(lb.port) for _ in range(100)) == {"a": 50, "b": 50}
            _admin(admin, f"/pools/main/backends/{b.address}/disable", post=True)
            _admin(admin, f"/pools/main/backends/{b.address}/enable", post=True)
            status = _backends(admin)[b.address]
            assert (status["weight"], status["effective_weight"]) == (100, 1)
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as resp:
                metrics = resp.read().decode()
            labels = rf'{{[^}}]*backend="{re.escape(b.address)}"[^}}]*}}'
            found = re.search(rf"l4lb_backend_effective_weight{labels} (\S+)", metrics)
            assert found is not None and float(found.group(1)) == 1.0
            got = Counter(_who(lb.port) for _ in range(100))
            assert got["b"] <= 1 and got["a"] >= 99, got  # 1 in 101 while the ramp is at 1%


def _held(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
    recv_all(sock)


def _ss(filter_: str) -> str:
    cmd = ["ss", "-tnoH", "state", "established", filter_]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("keepalive", [True, False])
def test_tcp_keepalive_on_the_client_and_backend_sockets(tmp_path: Path, keepalive: bool) -> None:
    pool = {"tcp_keepalive": "600s", "tcp_keepalive_interval": "7s"} if keepalive else {}
    with backend(_held) as held:
        port = free_port()
        with l4lb(tmp_path, config_text(f"127.0.0.1:{port}", [held.address], pool=pool)):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                client.sendall(b"x")
                assert wait_for(lambda: held.current is not None)
                front = _ss(f"( sport = :{port} )")  # the balancer's accepted socket
                back = _ss(f"( dport = :{held.port} )")  # the balancer's backend socket
            assert front.strip() and back.strip()
            for line in (front, back):
                # 600 s idle: the first probe is due in 9 min something (the default is 2 h)
                found = re.search(r"timer:\(keepalive,(\d+)min", line)
                if keepalive:
                    assert found is not None and int(found.group(1)) in (9, 10), line
                else:
                    assert "keepalive" not in line, line


def _ticker(stop: threading.Event) -> Any:
    """A backend that sends a byte every 20 ms until the connection breaks."""

    def handler(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
        while not stop.is_set():
            try:
                sock.sendall(b".")
            except OSError:
                return
            stop.wait(0.02)

    return handler


@pytest.mark.parametrize("mode", RELAY_MODES)
def test_client_timeout_closes_when_the_client_is_silent(tmp_path: Path, mode: str) -> None:
    stop = threading.Event()
    pool = {"client_timeout": "300ms", "idle_timeout": "10m"}
    try:
        with backend(_ticker(stop)) as ticking:
            port = free_port()
            text = config_text(
                f"127.0.0.1:{port}", [ticking.address], pool=pool, top={"relay": mode}
            )
            with l4lb(tmp_path, text) as lb:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                    client.settimeout(20)
                    received = recv_all(client)  # the backend never stops: only the timeout ends it
                line = lb.wait_access(1)[0]
    finally:
        stop.set()
    assert line["end"] == "client_timeout", line
    assert len(received) > 0 and line["bytes_to_client"] == len(received)


@pytest.mark.parametrize("mode", RELAY_MODES)
def test_server_timeout_closes_when_the_backend_is_silent(tmp_path: Path, mode: str) -> None:
    pool = {"server_timeout": "300ms", "idle_timeout": "10m"}
    with backend(_held) as silent:
        port = free_port()
        text = config_text(f"127.0.0.1:{port}", [silent.address], pool=pool, top={"relay": mode})
        with l4lb(tmp_path, text) as lb:
            sent = 0
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                deadline = time.monotonic() + 20  # a bound on the test, not a timing assertion
                while time.monotonic() < deadline and not lb.access_lines():
                    try:
                        client.sendall(b"x")  # the client keeps talking: not idle
                    except OSError:
                        break
                    sent += 1
                    time.sleep(0.02)
            line = lb.wait_access(1)[0]
    assert line["end"] == "server_timeout", line
    assert line["bytes_to_client"] == 0 and line["bytes_from_client"] > 0
