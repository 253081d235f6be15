"""``workers = 2`` behind one upstream proxy (``accept_proxy``): both workers take connections.

Steering by socket peer sent every connection from one upstream HAProxy to one worker. Behind a
proxy the kernel's hash spreads them instead, and per-client limits are said to be per worker.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from tests.balancer.helpers import backend, hello
from tests.support.l4lb import config_text, l4lb
from tests.support.peers import free_port, wait_for


def sockets_of(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            continue
    return count


def worker_pids(text: str) -> list[int]:
    return [
        int(line.split("pid=")[1].split()[0])
        for line in text.splitlines()
        if "event=worker_started" in line
    ]


def test_one_upstream_reaches_both_workers(tmp_path: Path) -> None:
    port = free_port()
    with backend(hello) as be:
        text = config_text(
            f"127.0.0.1:{port}",
            [be.address],
            top={"workers": 2},
            listener={"accept_proxy": "required", "trusted_proxies": ["127.0.0.5/32"]},
        )
        with l4lb(tmp_path, text) as lb:
            assert wait_for(lambda: lb.log_text().count("event=started") == 2, 20)
            pids = worker_pids(lb.log_text())
            before = {pid: sockets_of(pid) for pid in pids}
            held = []
            try:
                for i in range(40):  # one upstream (127.0.0.5), forty different clients
                    s = socket.socket()
                    s.settimeout(10)
                    s.bind(("127.0.0.5", 0))
                    s.connect(("127.0.0.1", port))
                    s.sendall(f"PROXY TCP4 198.51.100.{i + 1} 203.0.113.1 4000 443\r\n".encode())
                    assert s.recv(100).startswith(f"client=('198.51.100.{i + 1}'".encode())
                    held.append(s)
                gained = {pid: sockets_of(pid) - before[pid] for pid in pids}
                # 2 sockets per relayed connection; each worker took some (all 40 on one: 2^-39)
                assert sum(gained.values()) >= 80
                assert all(g >= 2 for g in gained.values()), gained
            finally:
                for s in held:
                    s.close()
            assert "event=steering_off listener=main reason=accept_proxy" in lb.log_text()


def test_per_client_limits_behind_a_proxy_are_said_to_be_per_worker(tmp_path: Path) -> None:
    port = free_port()
    text = config_text(
        f"127.0.0.1:{port}",
        ["127.0.0.1:9"],
        top={"workers": 2},
        listener={
            "accept_proxy": "optional",
            "trusted_proxies": ["127.0.0.5/32"],
            "max_conns_per_client": 3,
        },
    )
    with l4lb(tmp_path, text) as lb:
        lb.wait_log("event=per_client_limits_per_worker listener=main workers=2")
    # the same limit on a listener whose socket peer is the client: exact, nothing to say
    port = free_port()
    text = config_text(
        f"127.0.0.1:{port}",
        ["127.0.0.1:9"],
        top={"workers": 2},
        listener={"max_conns_per_client": 3},
    )
    with l4lb(tmp_path / "direct", text) as lb:
        assert wait_for(lambda: lb.log_text().count("event=started") == 2, 20)
        assert "per_client_limits_per_worker" not in lb.log_text()
        assert "steering_off" not in lb.log_text()
