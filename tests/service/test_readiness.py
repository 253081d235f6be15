"""Readiness for upstream balancers: ``GET /ready`` on the admin port, and PROXY ``LOCAL``
connections (an upstream's health checks) counted as checks, not as client connections.

A real HAProxy in front of l4lb checks ``/ready`` (``option httpchk`` on the admin port) and
marks l4lb down while its only pool has no up backend, up again once a backend returns.
"""

from __future__ import annotations

import socket
from pathlib import Path

from l4lb.proxy_protocol import Command, local_header, parse
from tests.service.helpers import admin_get
from tests.support.echo_backend import EchoBackend
from tests.support.l4lb import config_text, l4lb
from tests.support.logs import complete_text
from tests.support.peers import free_port, haproxy, wait_for

FAST_CHECKS = {"check": "tcp", "interval": "200ms", "timeout": "500ms", "rise": 1, "fall": 1}


def _config(lb_port: int, admin_port: int, backend: str, **listener: object) -> str:
    text = config_text(f"127.0.0.1:{lb_port}", [backend], health=FAST_CHECKS, listener=listener)
    return text + f'\n[admin]\nbind = "127.0.0.1:{admin_port}"\n'


def _ready(admin_port: int) -> int:
    return admin_get(admin_port, "/ready")[0]


def test_ready_follows_the_pool_and_the_stop(tmp_path: Path) -> None:
    lb_port, admin_port = free_port(), free_port()
    backend = EchoBackend("echo").start()
    port = int(backend.address.rsplit(":", 1)[1])
    try:
        with l4lb(tmp_path / "lb", _config(lb_port, admin_port, backend.address)) as lb:
            assert wait_for(lambda: _ready(admin_port) == 200, 10)
            status, doc = admin_get(admin_port, "/ready")
            assert doc["ready"] is True and doc["reasons"], doc
            backend.stop()
            assert wait_for(lambda: _ready(admin_port) == 503, 10)
            status, doc = admin_get(admin_port, "/ready")
            assert doc["ready"] is False
            assert "pool main has no up backend (0 of 1)" in doc["reasons"][0], doc
            backend = EchoBackend("echo", port=port).start()
            assert wait_for(lambda: _ready(admin_port) == 200, 10)
            # a graceful stop: not ready while connections drain
            held = socket.create_connection(("127.0.0.1", lb_port), timeout=10)
            held.sendall(b"hold\n")
            assert held.recv(5) == b"echo\n"
            lb.proc.terminate()
            assert wait_for(lambda: "event=draining" in lb.log_text(), 10)
            status, doc = admin_get(admin_port, "/ready")
            held.close()
            assert status == 503, doc
            assert doc["reasons"][0].startswith("stopping"), doc
    finally:
        backend.stop()


def _haproxy_states(workdir: Path) -> list[str]:
    """HAProxy's verdicts on server l4lb/lb, in order ("UP" or "DOWN")."""
    states = []
    for line in complete_text(workdir / "haproxy.log").splitlines():
        if "Server l4lb/lb is DOWN" in line:
            states.append("DOWN")
        elif "Server l4lb/lb is UP" in line:
            states.append("UP")
    return states


def test_haproxy_marks_l4lb_down_through_ready_while_its_pool_is_empty(tmp_path: Path) -> None:
    front, lb_port, admin_port = free_port(), free_port(), free_port()
    hap = tmp_path / "haproxy"
    backend = EchoBackend("echo").start()
    port = int(backend.address.rsplit(":", 1)[1])
    body = (
        "frontend edge\n"
        f"    bind 127.0.0.1:{front}\n"
        "    default_backend l4lb\n"
        "backend l4lb\n"
        "    option httpchk GET /ready\n"
        "    http-check expect status 200\n"
        f"    server lb 127.0.0.1:{lb_port} check port {admin_port} inter 200ms fall 1 rise 1\n"
    )
    try:
        with (
            l4lb(tmp_path / "lb", _config(lb_port, admin_port, backend.address)),
            haproxy(hap, body, wait=[("127.0.0.1", front)]),
        ):
            assert wait_for(lambda: _ready(admin_port) == 200, 10)
            with socket.create_connection(("127.0.0.1", front), timeout=10) as sock:
                sock.sendall(b"via haproxy\n")
                assert sock.recv(5) == b"echo\n"
            backend.stop()
            assert wait_for(lambda: "DOWN" in _haproxy_states(hap), 15), complete_text(
                hap / "haproxy.log"
            )
            backend = EchoBackend("echo", port=port).start()
            assert wait_for(lambda: _haproxy_states(hap)[-1:] == ["UP"], 15), complete_text(
                hap / "haproxy.log"
            )
            with socket.create_connection(("127.0.0.1", front), timeout=10) as sock:
                sock.sendall(b"back again\n")
                assert sock.recv(5) == b"echo\n"
    finally:
        backend.stop()


def _local_check(port: int) -> bytes:
    """Send a PROXY v2 LOCAL header as an upstream health check does; what came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(local_header(2))
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
        return received


TRUST = {"accept_proxy": "required", "trusted_proxies": ["127.0.0.1/32"]}


def test_local_checks_answered_without_a_backend(tmp_path: Path) -> None:
    lb_port, admin_port = free_port(), free_port()
    with EchoBackend("echo") as backend:
        config = _config(lb_port, admin_port, backend.address, local_checks="answer", **TRUST)
        with l4lb(tmp_path / "lb", config) as lb:
            assert wait_for(lambda: _ready(admin_port) == 200, 10)
            checks = [_local_check(lb_port) for _ in range(3)]
            assert checks == [b"", b"", b""]  # closed right after the header
            _, status = admin_get(admin_port, "/status")
            listener = status["listeners"][0]
            assert listener["health_checks"] == {"answered": 3}, listener
            assert listener["total"] == 0 and listener["rejected"] == 0, listener
            assert not lb.access_lines()
            assert "event=health_check" not in lb.log_text()  # debug only
            assert [h for h in backend.headers if h] == []  # (its own TCP checks send none)
            metrics = admin_get_text(admin_port, "/metrics")
            assert 'l4lb_health_checks_total{action="answered",listener="main"} 3.0' in metrics


def test_local_checks_passed_on_are_counted_and_not_logged(tmp_path: Path) -> None:
    lb_port, admin_port = free_port(), free_port()
    with EchoBackend("echo") as backend:
        config = _config(
            lb_port, admin_port, backend.address, allow=["192.0.2.0/24"], **TRUST
        )  # allow excludes the upstream: a check is not a client and is not rejected
        with l4lb(tmp_path / "lb", config) as lb:
            assert wait_for(lambda: _ready(admin_port) == 200, 10)
            assert _local_check(lb_port) == b"echo\n"
            proxied = [h for h in backend.headers if h]  # (l4lb's own TCP checks send none)
            assert len(proxied) == 1, backend.headers
            assert parse(proxied[0])[0].command is Command.PROXY  # l4lb's own header
            _, status = admin_get(admin_port, "/status")
            listener = status["listeners"][0]
            assert listener["health_checks"] == {"passed": 1}, listener
            assert listener["rejected"] == 0, listener
            assert not lb.access_lines()


def admin_get_text(port: int, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return str(resp.read().decode())
