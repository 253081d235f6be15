"""Health checks in a real ``l4lb run``: backends go down and come back, traffic follows.

Backends are real servers: restartable echo servers (tests/support/echo_backend.py) and real
nginx with ``proxy_protocol`` for the checks that speak to a PROXY-requiring backend.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from l4lb.proxy_protocol import local_header
from tests.observe.live import Ports, eventually, l4lb_run
from tests.support.echo_backend import EchoBackend, echo_through
from tests.support.l4lb import config_text, l4lb
from tests.support.peers import NGINX_STREAM_MODULE, connect_from, free_port, have, nginx, wait_for

HEALTH = """
[pools.web.health]
check = "{check}"
interval = "{interval}"
timeout = "500ms"
rise = 2
fall = 2
"""


def config(ports: Ports, backends: list[str], check: str, interval: str) -> str:
    listed = ", ".join(f'{{ address = "{b}" }}' for b in backends)
    return f"""
workers = 1
drain_timeout = "2s"

[[listeners]]
name = "front"
bind = "127.0.0.1:{ports["front"]}"
pool = "web"

[pools.web]
send_proxy = "v2"
connect_timeout = "1s"
retries = 1
backends = [{listed}]
{HEALTH.format(check=check, interval=interval)}
[log]
access = "off"

[admin]
bind = "127.0.0.1:{ports["admin"]}"
"""


def names_seen(port: int, n: int) -> list[str]:
    seen = []
    for i in range(n):
        payload = os.urandom(64) + str(i).encode()
        name, echoed = echo_through("127.0.0.1", port, payload)
        assert echoed == payload
        seen.append(name)
    return seen


def test_backend_down_traffic_moves_then_rejoins(tmp_path: Path) -> None:
    a, b = EchoBackend("a").start(), EchoBackend("b").start()
    try:
        cfg = config(Ports(), [a.address, b.address], "proxy-local", "200ms")
        with l4lb_run(tmp_path, cfg) as lb:
            front = lb.port("front")
            assert set(names_seen(front, 10)) == {"a", "b"}
            # every check sent a v2 LOCAL header first, and the echo server consumed it
            assert b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00" in a.headers

            b.stop()
            lb.wait_state("web", b.address, "down", timeout=15)
            check = lb.backend("web", b.address)["check"]
            assert check["ok"] is False and "refused" in check["detail"].lower()
            lb.wait_log("event=health_down pool=web backend=" + b.address)
            assert names_seen(front, 10) == ["a"] * 10

            b.start()
            lb.wait_state("web", b.address, "up", timeout=15)
            lb.wait_log("event=health_up pool=web backend=" + b.address)
            assert set(names_seen(front, 10)) == {"a", "b"}

            # every backend down: clients are refused promptly, and the log says why
            a.stop()
            b.stop()
            lb.wait_state("web", a.address, "down", timeout=15)
            lb.wait_state("web", b.address, "down", timeout=15)
            # (a client left waiting would hit the socket timeout and fail the test)
            try:
                with socket.create_connection(("127.0.0.1", front), timeout=10) as sock:
                    sock.sendall(b"hello?")
                    data = sock.recv(100)
            except ConnectionResetError:  # closed with a reset, even during the handshake
                data = b""
            assert data == b"", data
            lb.wait_log("pool_empty pool=web")
            eventually(
                lambda: "event=no_backend listener=front pool=web" in lb.log_text(),
                what="the refused client's log line",
            )
    finally:
        a.stop()
        b.stop()


def test_passive_failures_mark_down_before_the_next_check(tmp_path: Path) -> None:
    """With checks an hour apart, only failed connects can take the backend down."""
    a, b = EchoBackend("a").start(), EchoBackend("b").start()
    try:
        cfg = config(Ports(), [a.address, b.address], "tcp", "1h")
        with l4lb_run(tmp_path, cfg) as lb:
            front = lb.port("front")
            eventually(lambda: lb.backend("web", b.address)["check"] is not None, what="1st check")
            b.stop()
            # Each connect to b fails, is retried on a: clients never notice.
            names = names_seen(front, 8)
            assert names.count("a") == 8
            lb.wait_state("web", b.address, "down", timeout=5)
            status = lb.backend("web", b.address)
            assert status["check"]["source"] == "passive"
            assert status["connect_failures"] == 2
            lb.wait_log(f"event=health_down pool=web backend={b.address} check=passive")
    finally:
        a.stop()
        b.stop()


CHECKS = {
    # pool: (check settings, which nginx server, expected state, detail fragment)
    "tcp": ('check = "tcp"', "echo", "up", "connected"),
    "plocal": ('check = "proxy-local"', "stream_ok", "up", "PROXY v2 LOCAL"),
    "http2": ('check = "http"\nhttp_path = "/healthz"', "http", "up", "HTTP 200"),
    "http404": ('check = "http"\nhttp_path = "/missing"', "http", "down", "HTTP 404"),
    "sendexp": (
        'check = "send-expect"\nsend = "PING\\r\\n"\nexpect = "PONG"',
        "stream_pong",
        "up",
        "got 'PONG'",
    ),
    "sendbad": (
        'check = "send-expect"\nsend = "PING\\r\\n"\nexpect = "NOPE"',
        "stream_pong",
        "down",
        "expected 'NOPE'",
    ),
}


@pytest.mark.skipif(not have("nginx") or not os.path.exists(NGINX_STREAM_MODULE), reason="nginx")
def test_each_check_type_against_real_backends(tmp_path: Path) -> None:
    ports = Ports()  # nginx's ports, l4lb's listeners and its admin API
    echo = EchoBackend("echo").start()
    stream = (
        f'server {{ listen 127.0.0.1:{ports["stream_ok"]} proxy_protocol; return "hi\\n"; }}\n'
        f"server {{ listen 127.0.0.1:{ports['stream_pong']} proxy_protocol; "
        'return "+PONG\\r\\n"; }'
    )
    http = (
        f"server {{ listen 127.0.0.1:{ports['http']} proxy_protocol; "
        'location = /healthz { return 200 "ok\\n"; } }'
    )
    parts = ["workers = 1", '[log]\naccess = "off"']
    addresses = {}
    for pool, (settings, server, _, _) in CHECKS.items():
        addresses[pool] = echo.address if server == "echo" else f"127.0.0.1:{ports[server]}"
        # http2 sends v2 LOCAL, http404 v1 UNKNOWN: nginx accepts both before the request
        version = "v1" if pool == "http404" else "v2"
        parts.append(
            f'[[listeners]]\nname = "{pool}"\nbind = "127.0.0.1:{ports[pool]}"\npool = "{pool}"\n'
        )
        parts.append(
            f'[pools.{pool}]\nsend_proxy = "{version}"\n'
            f'backends = [{{ address = "{addresses[pool]}" }}]\n'
            f'[pools.{pool}.health]\n{settings}\ninterval = "200ms"\ntimeout = "1s"\n'
            "rise = 1\nfall = 1\n"
        )
    parts.insert(1, f'[admin]\nbind = "127.0.0.1:{ports["admin"]}"\n')
    cfg = "\n".join(parts)
    waits = [("127.0.0.1", ports[name]) for name in ("stream_ok", "stream_pong", "http")]
    try:
        with (
            nginx(tmp_path / "nginx", stream=stream, http=http, wait=waits) as ngx,
            l4lb_run(tmp_path / "l4lb", cfg) as lb,
        ):

            def detail_of(pool: str) -> str:
                check = lb.backend(pool, addresses[pool])["check"] or {}
                return str(check.get("detail", ""))

            for pool, (_, _, state, detail) in CHECKS.items():
                lb.wait_state(pool, addresses[pool], state, timeout=15)
                eventually(lambda p=pool, d=detail: d in detail_of(p), what=f"{pool}: {detail}")
            error_log = (tmp_path / "nginx" / "error.log").read_text()
            # ('broken header: ""' is the harness's own port probe, which sends nothing)
            assert not re.search(r'broken header: "[^"]', error_log), error_log
            ngx.terminate()
            ngx.wait(10)
            for pool in ("plocal", "http2", "sendexp"):
                lb.wait_state(pool, addresses[pool], "down", timeout=15)
                assert "refused" in detail_of(pool).lower()
    finally:
        echo.stop()


def test_maglev_moves_only_the_down_backends_clients(tmp_path: Path) -> None:
    """With maglev, a backend going down moves its clients only; back up, they return."""
    backends = [EchoBackend(name).start() for name in ("a", "b", "c")]
    ports = Ports()
    cfg = config(ports, [x.address for x in backends], "tcp", "200ms").replace(
        'send_proxy = "v2"', 'balance = "maglev"\nsend_proxy = "v2"'
    )
    clients = [f"127.0.{i}.{j}" for i in range(1, 7) for j in range(2, 7)]  # 30 addresses

    def mapping() -> dict[str, str]:
        seen = {}
        for source in clients:
            with connect_from(source, "127.0.0.1", ports["front"], timeout=10) as sock:
                sock.shutdown(socket.SHUT_WR)
                seen[source] = sock.recv(2).decode()[0]
        return seen

    try:
        with l4lb_run(tmp_path, cfg) as lb:
            before = mapping()
            assert set(before.values()) == {"a", "b", "c"}
            assert mapping() == before  # the same client always reaches the same backend
            c = backends[2]
            c.stop()
            lb.wait_state("web", c.address, "down", timeout=15)
            during = mapping()
            for source, name in before.items():
                if name == "c":
                    assert during[source] in ("a", "b")
                else:
                    assert during[source] == name, source
            c.start()
            lb.wait_state("web", c.address, "up", timeout=15)
            assert mapping() == before
    finally:
        for x in backends:
            x.stop()


# -- ``check = "proxy-local"`` sends each backend the header it receives: v2 LOCAL, v1 UNKNOWN, or
# nothing for a backend with ``send_proxy = "off"`` (it used to get a v2 header as data).


class Recorder:
    """A plain TCP server that records what each connection sent before closing."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while chunk := conn.recv(4096):
                        data += chunk
                except OSError:
                    pass
                self.received.append(data)


@contextmanager
def recorders(n: int) -> Iterator[list[Recorder]]:
    made = [Recorder() for _ in range(n)]
    try:
        yield made
    finally:
        for r in made:
            r.sock.close()


def test_proxy_local_follows_each_backends_send_proxy(tmp_path: Path) -> None:
    port = free_port()
    with recorders(3) as (v2, v1, off):
        backends = [
            {"address": f"127.0.0.1:{v2.port}"},
            {"address": f"127.0.0.1:{v1.port}", "send_proxy": "v1"},
            {"address": f"127.0.0.1:{off.port}", "send_proxy": "off"},
        ]
        text = config_text(
            f"127.0.0.1:{port}",
            backends,
            pool={"send_proxy": "v2"},
            health={"check": "proxy-local", "interval": "100ms"},
        )
        with l4lb(tmp_path, text) as lb:
            assert wait_for(lambda: all(len(r.received) >= 3 for r in (v2, v1, off)), 15)
            assert "Traceback" not in lb.log_text()
    assert set(v2.received) == {local_header(version=2)}
    assert set(v1.received) == {b"PROXY UNKNOWN\r\n"}
    assert set(off.received) == {b""}  # connected, sent nothing
