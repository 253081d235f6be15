"""Backends named by DNS, against a real DNS server on loopback whose records change during
the test (tests/support/dns_server.py): the real ``l4lb run``, real echo backends, steady
client traffic, and not one failed connection while the pool follows the records."""

from __future__ import annotations

import itertools
import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.observe.live import Running, eventually, l4lb_run
from tests.support.dns_server import DnsServer, Mode
from tests.support.echo_backend import EchoBackend
from tests.support.peers import connect_from, free_port
from tests.support.traffic import steady_traffic

A, B, C = "127.0.0.21", "127.0.0.22", "127.0.0.23"


@pytest.fixture
def dns() -> Any:
    server = DnsServer("127.0.0.53")
    try:
        yield server
    finally:
        server.close()


def shared_port() -> int:
    """A port free on A, B and C alike (NAME:PORT gives every address the same port)."""
    for _ in range(50):
        port = free_port(A)
        try:
            for host in (B, C):
                with socket.socket() as probe:
                    probe.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on all three addresses")


def config(
    dns: DnsServer,
    backends: str,
    *,
    health: bool = True,
    resolver: str = 'resolve_min = "200ms"\nresolve_max = "2s"\ntimeout = "500ms"',
    pools: str = "",
    front: str = "",
) -> str:
    checks = (
        '\n[pools.web.health]\ncheck = "tcp"\ninterval = "200ms"\nrise = 2\nfall = 2\n'
        if health
        else ""
    )
    return f"""
workers = 1
drain_timeout = "2s"

[[listeners]]
name = "front"
bind = "{front or f"127.0.0.1:{free_port()}"}"
pool = "web"

[pools.web]
send_proxy = "v2"
idle_timeout = "10s"
backends = {backends}
{checks}
{pools}
[resolver]
nameservers = ["{dns.address}"]
{resolver}

[log]
access = "off"

[admin]
bind = "127.0.0.1:{free_port()}"
"""


def backends_of(lb: Running, pool: str = "web") -> dict[str, dict[str, Any]]:
    for p in lb.status()["pools"]:
        if p["name"] == pool:
            return {b["address"]: b for b in p["backends"]}
    raise KeyError(pool)


def test_a_record_change_moves_traffic_with_no_failed_connection(
    tmp_path: Path, dns: DnsServer
) -> None:
    port = shared_port()
    name = f"app.test:{port}"
    dns.set("app.test", "A", [A], ttl=1)
    with (
        EchoBackend("a", A, port) as a,
        EchoBackend("b", B, port),
        l4lb_run(tmp_path, config(dns, f'[{{ address = "{name}" }}]')) as lb,
        steady_traffic("127.0.0.1", lb.port("front")) as traffic,
    ):
        traffic.wait_streak({"a"}, 10)
        status = backends_of(lb)
        assert status[a.address]["origin"] == "dns" and status[a.address]["name"] == name

        # a connection that stays open on a through the change: it must finish normally
        long = socket.create_connection(("127.0.0.1", lb.port("front")), timeout=10)
        assert long.recv(2) == b"a\n"

        dns.set("app.test", "A", [B], ttl=1)
        traffic.wait_streak({"b"}, 20)
        status = backends_of(lb)
        assert status[f"{B}:{port}"]["origin"] == "dns"
        assert status[a.address]["state"] == "drain" and status[a.address]["active"] == 1

        long.sendall(b"still here")
        long.shutdown(socket.SHUT_WR)
        echoed = b""
        while chunk := long.recv(65536):
            echoed += chunk
        long.close()
        assert echoed == b"still here"

        # drained: a is forgotten once its last connection ended
        eventually(lambda: a.address not in backends_of(lb), what="a forgotten")
        lb.wait_log("event=backend_removed pool=web backend=" + a.address)
        traffic.stop()
        assert traffic.failures == []


def test_an_address_that_appears_takes_traffic_only_after_its_health_checks(
    tmp_path: Path, dns: DnsServer
) -> None:
    port = shared_port()
    dns.set("app.test", "A", [A], ttl=1)
    with (
        EchoBackend("a", A, port),
        l4lb_run(tmp_path, config(dns, f'[{{ address = "app.test:{port}" }}]')) as lb,
        steady_traffic("127.0.0.1", lb.port("front")) as traffic,
    ):
        traffic.wait_streak({"a"}, 5)
        dns.set("app.test", "A", [A, C], ttl=1)  # nothing listens on C yet
        newcomer = f"{C}:{port}"
        eventually(lambda: newcomer in backends_of(lb), what="C joined the pool")
        eventually(lambda: backends_of(lb)[newcomer]["check"] is not None, what="C health-checked")
        joined = backends_of(lb)[newcomer]
        # joined down, and no connection was sent to it (none failed, none retried)
        assert joined["state"] == "down", joined
        assert joined["total"] == 0 and joined["connect_failures"] == 0, joined
        with EchoBackend("c", C, port):
            lb.wait_state("web", newcomer, "up")
            traffic.wait_served("c")
            traffic.stop()  # before c stops: its connection in flight would be reset
        assert traffic.failures == []


def metric(lb: Running, family: str, **labels: str) -> float:
    """The sample's value; 0 when there is none yet (a counter not yet counted)."""
    code, body = lb.get("/metrics")
    assert code == 200
    for line in body.decode().splitlines():
        if line.startswith(family + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_failed_resolution_keeps_the_last_answer(tmp_path: Path, dns: DnsServer) -> None:
    port = shared_port()
    name = f"app.test:{port}"
    dns.set("app.test", "A", [A], ttl=1)
    text = config(
        dns,
        f'[{{ address = "{name}" }}]',
        resolver='resolve_min = "200ms"\nresolve_max = "400ms"\ntimeout = "300ms"',
    )
    with (
        EchoBackend("a", A, port) as a,
        l4lb_run(tmp_path, text) as lb,
        steady_traffic("127.0.0.1", lb.port("front")) as traffic,
    ):
        traffic.wait_streak({"a"}, 5)
        for mode, reason in ((Mode.SERVFAIL, "servfail"), (Mode.DROP, "timeout")):
            dns.mode = mode
            eventually(
                lambda reason=reason: (
                    metric(  # type: ignore[misc]
                        lb, "l4lb_dns_resolutions_total", pool="web", result=reason
                    )
                    >= 2
                ),
                what=f"two {reason} resolutions",
            )
            assert set(traffic.wait_more(traffic.mark())) == {"a"}
            assert backends_of(lb)[a.address]["state"] == "up"
        dns.mode = Mode.ANSWER
        dns.remove("app.test", "A")  # the name is gone: NXDOMAIN
        eventually(
            lambda: metric(lb, "l4lb_dns_resolutions_total", pool="web", result="nxdomain") >= 1,
            what="an nxdomain resolution",
        )
        assert set(traffic.wait_more(traffic.mark())) == {"a"}
        assert metric(lb, "l4lb_dns_addresses", pool="web", name=name) == 1
        record = lb.status()["dns"][0]
        assert record["name"] == name and record["addresses"] == [a.address]
        assert "no such name" in record["last_error"]
        log = lb.wait_log("reason=nxdomain")  # the last of the three: the others are written
        assert re.search(r"event=resolve_failed pool=web name=\S+ reason=servfail .*kept=1", log)
        assert "reason=timeout" in log
        traffic.stop()
        assert traffic.failures == []


def test_the_ttl_decides_when_to_ask_again_within_resolve_min_and_max(
    tmp_path: Path, dns: DnsServer
) -> None:
    """TTL 0 is asked again no sooner than resolve_min; TTL 3600 no later than resolve_max
    (asked again at all, within the test). Gaps are read at the DNS server."""
    port = shared_port()
    dns.set("short.test", "A", [A], ttl=0)
    dns.set("long.test", "A", [B], ttl=3600)
    other = f"""
[[listeners]]
name = "other"
bind = "127.0.0.1:{free_port()}"
pool = "long"

[pools.long]
backends = [{{ address = "long.test:{port}" }}]
"""
    text = config(
        dns,
        f'[{{ address = "short.test:{port}" }}]',
        health=False,
        resolver='resolve_min = "300ms"\nresolve_max = "1s"\ntimeout = "500ms"',
        pools=other,
    )
    with l4lb_run(tmp_path, text):
        queries = dns.wait_queries(
            lambda qs: (
                sum(q.name == "short.test." and q.rdtype == "A" for q in qs) >= 5
                and sum(q.name == "long.test." and q.rdtype == "A" for q in qs) >= 3
            ),
            timeout=30,
        )
    for name in ("short.test.", "long.test."):
        times = [q.at for q in queries if q.name == name and q.rdtype == "A"]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # the lower bound only: a busy machine can make gaps longer, never shorter
        assert min(gaps) >= 0.3 * 0.9, (name, gaps)


def test_srv_records_give_port_and_weight_and_priority_decides(
    tmp_path: Path, dns: DnsServer
) -> None:
    ports = [free_port(A), free_port(B), free_port(C)]
    dns.set("t1.app.test", "A", [A], ttl=1)
    dns.set("t2.app.test", "A", [B], ttl=1)
    dns.set("t3.app.test", "A", [C], ttl=1)
    srv = "_echo._tcp.app.test"
    dns.set(
        srv,
        "SRV",
        [
            f"10 30 {ports[0]} t1.app.test.",
            f"10 10 {ports[1]} t2.app.test.",
            f"20 10 {ports[2]} t3.app.test.",
        ],
        ttl=1,
    )
    text = config(dns, f'[{{ address = "srv+{srv}" }}]', health=False)
    with (
        EchoBackend("a", A, ports[0]) as a,
        EchoBackend("b", B, ports[1]) as b,
        EchoBackend("c", C, ports[2]) as c,
        l4lb_run(tmp_path, text) as lb,
        steady_traffic("127.0.0.1", lb.port("front")) as traffic,
    ):
        status = backends_of(lb)
        assert set(status) == {a.address, b.address}  # priority 20 is not used while 10 is
        assert status[a.address]["weight"] == 30 and status[b.address]["weight"] == 10
        assert {s["name"] for s in status.values()} == {f"srv+{srv}"}
        traffic.wait_served("a")
        traffic.wait_served("b")
        assert "c" not in traffic.served
        # the priority-10 records go: traffic moves to c, with no failed connection
        dns.set(srv, "SRV", [f"20 10 {ports[2]} t3.app.test."], ttl=1)
        traffic.wait_streak({"c"}, 20)
        eventually(lambda: set(backends_of(lb)) == {c.address}, what="only c left")
        traffic.stop()
        assert traffic.failures == []
        doc = json.loads(lb.get("/status")[1])
        assert doc["dns"][0]["addresses"] == [c.address]


def test_every_worker_follows_the_records(tmp_path: Path, dns: DnsServer) -> None:
    """With workers = 2 each worker resolves on its own: after a change, clients spread over
    both workers (BPF steering by client address) all reach the new address."""
    port = shared_port()
    dns.set("app.test", "A", [A], ttl=1)
    text = config(dns, f'[{{ address = "app.test:{port}" }}]').replace("workers = 1", "workers = 2")
    sources = [f"127.0.{i}.{j}" for i in range(1, 5) for j in range(2, 7)]

    def served() -> set[str]:
        names = set()
        for source in sources:
            with connect_from(source, "127.0.0.1", lb.port("front"), timeout=10) as sock:
                sock.shutdown(socket.SHUT_WR)
                names.add(sock.recv(2).decode().strip())
        return names

    with (
        EchoBackend("a", A, port),
        EchoBackend("b", B, port),
        l4lb_run(tmp_path, text) as lb,
    ):
        eventually(lambda: lb.status()["workers"] == 2, what="both workers in /status")
        assert served() == {"a"}
        dns.set("app.test", "A", [B], ttl=1)
        eventually(lambda: served() == {"b"}, what="every worker sends every client to b")
        # (a still listens: a worker that had not followed the record would still reach it)
        assert lb.status()["dns"][0]["addresses"] == [f"{B}:{port}"]


def test_a_large_answer_comes_over_tcp(tmp_path: Path, dns: DnsServer) -> None:
    """200 A records do not fit a UDP answer: the server truncates it, the resolver asks again
    over TCP, and every address joins the pool."""
    hosts = [f"127.0.{i // 250 + 100}.{i % 250 + 1}" for i in range(200)]
    dns.set("many.test", "A", hosts, ttl=60)
    text = config(dns, '[{ address = "many.test:9" }]', health=False)
    with l4lb_run(tmp_path, text) as lb:
        assert len(backends_of(lb)) == 200
    transports = {q.transport for q in dns.queries("many.test", "A")}
    assert transports == {"udp", "tcp"}


def test_an_address_that_is_the_balancer_itself_is_left_out(tmp_path: Path, dns: DnsServer) -> None:
    """What `l4lb check` refuses for an IP:PORT backend (a loop into the balancer's own
    listener) is left out of a DNS answer, and said."""
    port = free_port(A)
    text = config(dns, f'[{{ address = "self.test:{port}" }}]', health=False, front=f"{A}:{port}")
    dns.set("self.test", "A", [A, B], ttl=60)
    with EchoBackend("b", B, port), l4lb_run(tmp_path, text) as lb:
        assert set(backends_of(lb)) == {f"{B}:{port}"}
        lb.wait_log(f"event=resolved_to_self pool=web name=self.test:{port} address={A}:{port}")
        with socket.create_connection((A, port), timeout=10) as sock:
            assert sock.recv(2) == b"b\n"


def test_a_reload_follows_the_names_in_the_file(tmp_path: Path, dns: DnsServer) -> None:
    """A reload that takes a name out forgets its backends and stops resolving it; one that
    puts it back resolves it again at once."""
    port = shared_port()
    dns.set("app.test", "A", [A], ttl=60)
    with (
        EchoBackend("a", A, port) as a,
        EchoBackend("b", B, port) as b,
        l4lb_run(tmp_path, config(dns, f'[{{ address = "app.test:{port}" }}]')) as lb,
    ):
        assert set(backends_of(lb)) == {a.address}
        named = lb.config.read_text()
        lb.config.write_text(named.replace(f"app.test:{port}", b.address))
        assert lb.post("/reload")[0] == 200
        assert set(backends_of(lb)) == {b.address}
        assert backends_of(lb)[b.address]["origin"] == "config"
        assert lb.status()["dns"] == []
        asked = len(dns.queries("app.test", "A"))
        lb.config.write_text(named)
        assert lb.post("/reload")[0] == 200
        eventually(lambda: a.address in backends_of(lb), what="the name resolved again")
        assert len(dns.queries("app.test", "A")) > asked
        assert backends_of(lb)[a.address]["origin"] == "dns"
