"""GET /metrics of a real ``l4lb run`` after real connections, parsed by prometheus_client."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.observe.live import Ports, eventually, l4lb_run
from tests.support.echo_backend import EchoBackend, echo_through
from tests.support.peers import connect_from

NAMES = [
    "l4lb_connections_total",
    "l4lb_connections_active",
    "l4lb_backend_connections_total",
    "l4lb_backend_connections_active",
    "l4lb_bytes_total",
    "l4lb_rejections_total",
    "l4lb_proxy_header_errors_total",
    "l4lb_backend_up",
    "l4lb_check_duration_seconds_count",
    "l4lb_connect_duration_seconds_bucket",
    "l4lb_connect_duration_seconds_count",
]


def scrape(admin: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from tests.observe.live import http

    code, body = http(f"http://{admin}/metrics")
    assert code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body.decode())
        for s in fam.samples
    }


def total(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return sum(
        v for (n, lbls), v in samples.items() if n == name and labels.items() <= dict(lbls).items()
    )


def closed_without_data(sock: socket.socket) -> bool:
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:
        return True


def test_metrics_after_real_connections(tmp_path: Path) -> None:
    a, b = EchoBackend("a").start(), EchoBackend("b").start()
    ports = Ports()
    front, edge, admin = ports["front"], ports["edge"], ports["admin"]
    config = f"""
workers = 1

[[listeners]]
name = "front"
bind = "127.0.0.1:{front}"
pool = "web"
deny = ["127.0.0.9/32"]

[[listeners]]
name = "edge"
bind = "127.0.0.1:{edge}"
pool = "web"
accept_proxy = "required"
trusted_proxies = ["127.0.0.1/32"]

[pools.web]
send_proxy = "v2"
backends = [{{ address = "{a.address}" }}, {{ address = "{b.address}" }}]

[pools.web.health]
check = "tcp"
interval = "200ms"

[log]
access = "off"

[admin]
bind = "127.0.0.1:{admin}"
"""
    try:
        with l4lb_run(tmp_path, config) as lb:
            sent = received = 0
            for i in range(6):
                payload = os.urandom(1000 * (i + 1))
                name, echoed = echo_through("127.0.0.1", front, payload)
                assert echoed == payload
                sent += len(payload)
                received += len(name) + 1 + len(echoed)
            # a denied client, and a bad PROXY header from a trusted upstream
            with connect_from("127.0.0.9", "127.0.0.1", front) as sock:
                assert closed_without_data(sock)
            with socket.create_connection(("127.0.0.1", edge), timeout=10) as sock:
                sock.sendall(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n")  # LF without CR
                assert closed_without_data(sock)
            eventually(lambda: lb.status()["listeners"][0]["active"] == 0, what="closed")
            eventually(
                lambda: total(scrape(lb.admin), "l4lb_bytes_total", direction="out") == received,
                what=f"byte counters: {received} expected, status {lb.status()}",
            )
            samples = scrape(lb.admin)
    finally:
        a.stop()
        b.stop()
    names = {name for name, _ in samples}
    assert set(NAMES) <= names, set(NAMES) - names
    assert total(samples, "l4lb_backend_connections_total") == 6
    assert total(samples, "l4lb_backend_connections_total", backend=a.address) == 3
    assert total(samples, "l4lb_connections_total", listener="front") >= 6
    assert total(samples, "l4lb_connections_active") == 0
    assert total(samples, "l4lb_bytes_total", direction="in") == sent
    assert total(samples, "l4lb_bytes_total", direction="out") == received
    assert total(samples, "l4lb_rejections_total", listener="front", reason="denied") == 1
    assert total(samples, "l4lb_rejections_total", listener="edge", reason="bad_header") == 1
    assert total(samples, "l4lb_proxy_header_errors_total") == 1
    assert total(samples, "l4lb_backend_up") == 2
    assert total(samples, "l4lb_connect_duration_seconds_count") == 6
    assert total(samples, "l4lb_connect_duration_seconds_bucket", le="+Inf") == 6
    assert total(samples, "l4lb_check_duration_seconds_count", backend=b.address) >= 1
