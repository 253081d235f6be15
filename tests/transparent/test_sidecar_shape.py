"""The sidecar shape: edge (l4lb, HAProxy ``send-proxy-v2``) -> l4lb on the backend host, in front
of legacy servers on loopback that know nothing of PROXY.

::

    client ns  203.0.113.10-13, 2001:db8:c::10-13
        |  c0: 203.0.113.1/24, 2001:db8:c::1/64
    edge ns    l4lb :80 (send_proxy = "v2"), HAProxy :81 (send-proxy-v2)
        |  h0: 192.0.2.1/24, 2001:db8:e::1/64
    host ns    192.0.2.2, 2001:db8:e::2 (no route to the clients at all)
               l4lb :8443 accept_proxy = "required" from the edge, source = "client"
               nginx 127.0.0.1:8080 / [::1]:8080, socketserver 127.0.0.1:8081 / [::1]:8081

Also go-mmproxy's three defects as regression tests: a request-then-FIN client gets the whole
answer (the socketserver answers 1 MiB after the FIN, through both edges), a PROXY header split
over two segments, and missing routing (refused at start with the commands; at run time a
connection ends with ``source_failed`` and a reset, not a hang).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from l4lb.proxy_protocol import build
from tests.support.logs import json_lines, wait_line
from tests.support.netns import Namespace, Namespaces, needs_root, sh
from tests.support.peers import stop_process, wait_for
from tests.transparent.topology import (
    fixes,
    http_get,
    log_words,
    new_spaces,
    port_open,
    request,
    start_l4lb,
    start_legacy,
    start_nginx,
    wait_started,
)

pytestmark = needs_root

CLIENTS = {
    4: [f"203.0.113.{10 + i}" for i in range(4)],
    6: [f"2001:db8:c::{10 + i}" for i in range(4)],
}
EDGE = {4: "203.0.113.1", 6: "2001:db8:c::1"}
EDGE_LINK = {4: "192.0.2.1", 6: "2001:db8:e::1"}
HOST = {4: "192.0.2.2", 6: "2001:db8:e::2"}
LOOP = {4: "127.0.0.1", 6: "::1"}


def bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def sidecar_config(
    workdir: Path, name: str, routing: str, ports: tuple[int, ...] = (8080, 8081)
) -> str:
    text = f"""\
workers = 1
drain_timeout = "2s"
transparent_routing = "{routing}"

[log]
access = "{workdir}/{name}-access.log"
"""
    for v in (4, 6):
        text += f"""
[[listeners]]
name = "v{v}"
bind = "{bracket(HOST[v])}:8443"
pool = "v{v}"
accept_proxy = "required"
trusted_proxies = ["{EDGE_LINK[v]}/{32 if v == 4 else 128}"]

[pools.v{v}]
source = "client"
send_proxy = "off"
connect_timeout = "1s"
retries = 0
backends = [{", ".join(f'{{ address = "{bracket(LOOP[v])}:{p}" }}' for p in ports)}]
"""
    return text


def edge_config(workdir: Path) -> str:
    text = f'workers = 1\ndrain_timeout = "2s"\n\n[log]\naccess = "{workdir}/edge-access.log"\n'
    for v in (4, 6):
        text += f"""
[[listeners]]
name = "v{v}"
bind = "{bracket(EDGE[v])}:80"
pool = "v{v}"

[pools.v{v}]
send_proxy = "v2"
backends = [{{ address = "{bracket(HOST[v])}:8443" }}]
"""
    return text


HAPROXY_CFG = """\
global
    log stdout format raw local0 info
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 30s
    timeout server 30s
listen v4
    bind 203.0.113.1:81
    server host 192.0.2.2:8443 send-proxy-v2
listen v6
    bind ipv6@2001:db8:c::1:81
    server host ipv6@2001:db8:e::2:8443 send-proxy-v2
"""


@dataclass
class Shape:
    spaces: Namespaces
    client: Namespace
    edge: Namespace
    host: Namespace
    workdir: Path
    nginx_log: Path
    legacy_log: Path


@pytest.fixture(scope="module")
def shape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shape]:
    workdir = tmp_path_factory.mktemp("sidecar-shape")
    spaces = new_spaces()
    try:
        c, edge, host = spaces.add("c"), spaces.add("e"), spaces.add("h")
        spaces.link(c, "eth0", edge, "c0")
        spaces.link(edge, "h0", host, "eth0")
        for v, prefix in ((4, 24), (6, 64)):
            first, *rest = CLIENTS[v]
            spaces.addr(
                c, "eth0", f"{first}/{prefix}", *(f"{a}/{32 if v == 4 else 128}" for a in rest)
            )
            c.ip(f"-{v}", "route", "add", "default", "via", EDGE[v])
            spaces.addr(edge, "c0", f"{EDGE[v]}/{prefix}")
            spaces.addr(edge, "h0", f"{EDGE_LINK[v]}/{prefix}")
            spaces.addr(host, "eth0", f"{HOST[v]}/{prefix}")
        nginx_log = start_nginx(spaces, host, workdir, ["127.0.0.1:8080", "[::1]:8080"])
        legacy_log = start_legacy(spaces, host, workdir, ["127.0.0.1:8081", "[::1]:8081"])
        edge_lb = start_l4lb(spaces, edge, workdir, "edge", edge_config(workdir))
        wait_started(edge_lb, workdir / "edge.log")
        (workdir / "haproxy.cfg").write_text(HAPROXY_CFG)
        spaces.start(
            edge, ["haproxy", "-db", "-f", str(workdir / "haproxy.cfg")], workdir / "haproxy.log"
        )
        assert wait_for(
            lambda: port_open(c, "203.0.113.1:81") and port_open(c, "[2001:db8:c::1]:81"), 15
        )
        yield Shape(spaces, c, edge, host, workdir, nginx_log, legacy_log)
    finally:
        spaces.close()
        assert not spaces.left_behind(), spaces.left_behind()


def rules(ns: Namespace) -> list[dict[str, object]]:
    """The namespace's policy rules at l4lb's priority (100), both families."""
    found: list[dict[str, object]] = []
    for v in ("-4", "-6"):
        found += [
            r
            for r in json.loads(ns.ip(v, "-j", "rule", "show") or "[]")
            if r.get("priority") == 100
        ]
    return found


@pytest.fixture
def sidecar(shape: Shape, request: pytest.FixtureRequest) -> Iterator[subprocess.Popen[bytes]]:
    """l4lb on the backend host with ``transparent_routing = "manage"``; its rules gone after."""
    name = f"sidecar-{request.node.name}"
    proc = start_l4lb(
        shape.spaces, shape.host, shape.workdir, name, sidecar_config(shape.workdir, name, "manage")
    )
    try:
        wait_started(proc, shape.workdir / f"{name}.log")
        yield proc
    finally:
        stop_process(proc, 15)
    assert proc.returncode == 0
    assert rules(shape.host) == []  # everything l4lb added is removed at stop


def test_missing_routing_is_refused_with_the_commands_that_work(shape: Shape) -> None:
    assert rules(shape.host) == []
    name = "refused"
    proc = start_l4lb(
        shape.spaces, shape.host, shape.workdir, name, sidecar_config(shape.workdir, name, "check")
    )
    assert proc.wait(20) == 1  # not a silent start whose connections would hang
    log = shape.workdir / f"{name}.log"
    assert "Traceback" not in log.read_text()
    commands = fixes(log)
    assert sorted(commands) == sorted(
        [
            f"ip -4 rule add pref 100 from 127.0.0.1 ipproto tcp sport {p} iif lo lookup 100"
            for p in (8080, 8081)
        ]
        + [
            f"ip -6 rule add pref 100 from ::1 ipproto tcp sport {p} iif lo lookup 100"
            for p in (8080, 8081)
        ]
        + [
            "ip -4 route add local 0.0.0.0/0 dev lo table 100",
            "ip -6 route add local ::/0 dev lo table 100",
        ]
    )
    for command in commands:  # exactly what l4lb said: then it starts and serves
        sh("ip", "netns", "exec", shape.host.name, *command.split())
    try:
        proc = start_l4lb(
            shape.spaces,
            shape.host,
            shape.workdir,
            "checked",
            sidecar_config(shape.workdir, "checked", "check"),
        )
        try:
            wait_started(proc, shape.workdir / "checked.log")
            answer = request(shape.client, CLIENTS[4][3], "203.0.113.1:80", http_get("/checked"))
            assert answer.endswith(f"hello {CLIENTS[4][3]}\n".encode())
        finally:
            stop_process(proc, 15)
    finally:
        for command in commands:
            sh("ip", "netns", "exec", shape.host.name, *command.replace(" add ", " del ").split())
    assert rules(shape.host) == []


def test_legacy_nginx_and_socketserver_see_the_real_clients(
    shape: Shape, sidecar: subprocess.Popen[bytes]
) -> None:
    assert len(rules(shape.host)) == 4  # installed by l4lb (manage)
    before_nginx, before_legacy = len(log_words(shape.nginx_log)), len(log_words(shape.legacy_log))
    sent = 0
    for v in (4, 6):
        for edge_port in (80, 81):  # the l4lb edge, the HAProxy edge
            for client in CLIENTS[v]:
                for _ in "ab":  # round robin on the host: nginx, then the socketserver
                    answer = request(
                        shape.client,
                        client,
                        f"{bracket(EDGE[v])}:{edge_port}",
                        http_get(f"/{edge_port}"),
                    )
                    sent += 1
                    if answer.startswith(b"peer "):  # after the FIN: the whole 1 MiB
                        assert answer.startswith(f"peer {client}\n".encode())
                        assert len(answer) == len(f"peer {client}\n") + (1 << 20)
                    else:
                        assert answer.endswith(f"hello {client}\n".encode()), answer[-80:]
    assert wait_for(
        lambda: (
            len(log_words(shape.nginx_log)) + len(log_words(shape.legacy_log))
            >= before_nginx + before_legacy + sent
        )
    )
    nginx = log_words(shape.nginx_log)[before_nginx:]
    legacy = log_words(shape.legacy_log)[before_legacy:]
    every = set(CLIENTS[4] + CLIENTS[6])
    assert {w[0] for w in nginx} == every  # never 127.0.0.1, never the edge
    assert {w[0] for w in legacy} == every
    assert {w[3] for w in nginx} == {"/80", "/81"}  # both edges: l4lb and HAProxy
    (shape.workdir / "figures-sidecar.json").write_text(
        json.dumps(
            {
                "nginx": sorted({w[0] for w in nginx}),
                "socketserver": sorted({w[0] for w in legacy}),
                "requests": sent,
            }
        )
    )


def _bytes_received(ns: Namespace, port: int) -> list[int]:
    """``bytes_received`` of each established connection to ``port`` (TCP_INFO, via ``ss``)."""
    out = sh("ip", "netns", "exec", ns.name, "ss", "-Htni", "state", "established",
             f"( sport = :{port} )")  # fmt: skip
    return [int(word.split(":")[1]) for word in out.split() if word.startswith("bytes_received:")]


@pytest.mark.parametrize("v", [4, 6])
def test_header_split_across_segments(
    shape: Shape, sidecar: subprocess.Popen[bytes], v: int
) -> None:
    client = "203.0.113.77" if v == 4 else "2001:db8:c::77"
    header = build(2, (client, 40000 + v), (EDGE[v], 80))
    s = shape.edge.socket(socket.AF_INET6 if v == 6 else socket.AF_INET)
    s.settimeout(10)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.bind((EDGE_LINK[v], 0))
        s.connect((HOST[v], 8443))
        s.sendall(header[:11])  # the signature is not even complete
        # it reached the host's l4lb alone (l4lb takes header bytes as they come: no Recv-Q)
        assert wait_for(lambda: _bytes_received(shape.host, 8443) == [11], 10)
        s.sendall(header[11:] + http_get("/split"))
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    finally:
        s.close()
    assert answer.endswith(f"hello {client}\n".encode()) or answer.startswith(
        f"peer {client}\n".encode()
    )


def test_missing_rule_at_run_time_ends_with_a_reason_not_a_hang(shape: Shape) -> None:
    name = "norule"
    proc = start_l4lb(
        shape.spaces, shape.host, shape.workdir, name, sidecar_config(shape.workdir, name, "off")
    )
    try:
        wait_started(proc, shape.workdir / f"{name}.log")
        for v in (4, 6):
            client = CLIENTS[v][0]
            # the host's l4lb resets the edge's connection, the edge resets the client's
            with pytest.raises(ConnectionResetError):
                request(shape.client, client, f"{bracket(EDGE[v])}:80", b"GET /", timeout=20)
        access = shape.workdir / f"{name}-access.log"
        assert wait_for(lambda: len(json_lines(access)) >= 2)
        lines = json_lines(access)
        assert [line["end"] for line in lines] == ["source_failed", "source_failed"]
        assert all("no reply came back" in line["detail"] for line in lines)
        wait_line(shape.workdir / f"{name}.log", "event=source_failed")
    finally:
        stop_process(proc, 15)


def test_managed_rules_follow_a_reload(shape: Shape, sidecar: subprocess.Popen[bytes]) -> None:
    name = f"sidecar-{test_managed_rules_follow_a_reload.__name__}"
    path = shape.workdir / f"{name}.toml"
    ports = lambda: sorted((r["src"], r["sport"]) for r in rules(shape.host))  # noqa: E731
    assert ports() == [("127.0.0.1", 8080), ("127.0.0.1", 8081), ("::1", 8080), ("::1", 8081)]
    # the socketserver leaves both pools: its two rules go, nginx's stay
    path.write_text(sidecar_config(shape.workdir, name, "manage", ports=(8080,)))
    log = shape.workdir / f"{name}.log"
    sidecar.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "event=reloaded" in log.read_text(), 10), log.read_text()
    assert ports() == [("127.0.0.1", 8080), ("::1", 8080)]
    answer = request(shape.client, CLIENTS[6][2], "[2001:db8:c::1]:81", http_get("/reloaded"))
    assert answer.endswith(f"hello {CLIENTS[6][2]}\n".encode())
