"""The balancer shape: client -> l4lb -> legacy backends whose default route is the l4lb node.

::

    client ns  203.0.113.10-13, 2001:db8:c::10-13
        |  c0: 203.0.113.1/24, 2001:db8:c::1/64
    l4lb ns   listener 203.0.113.1:80 and [2001:db8:c::1]:80, source = "client", send_proxy = "off"
        |  b0: 198.51.100.1/24, 2001:db8:b::1/64
    backend ns  198.51.100.20, 2001:db8:b::20 (default routes via l4lb)
                nginx :8080 (no proxy_protocol, logs $remote_addr), socketserver :8081

l4lb first refuses to start (the return routing is missing) and names the commands; the test runs
exactly those commands, and then every client address shows up in both backends' own logs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.logs import json_lines
from tests.support.netns import Namespace, Namespaces, needs_root, sh
from tests.support.peers import stop_process, wait_for
from tests.transparent.topology import (
    fixes,
    http_get,
    log_words,
    new_spaces,
    request,
    start_l4lb,
    start_legacy,
    start_nginx,
    wait_started,
)

pytestmark = needs_root

CLIENTS_V4 = [f"203.0.113.{10 + i}" for i in range(4)]
CLIENTS_V6 = [f"2001:db8:c::{10 + i}" for i in range(4)]
BACKEND_V4, BACKEND_V6 = "198.51.100.20", "2001:db8:b::20"
VIP_V4, VIP_V6 = "203.0.113.1:80", "[2001:db8:c::1]:80"


def config(workdir: Path, routing: str) -> str:
    return f"""\
workers = 1
drain_timeout = "2s"
transparent_routing = "{routing}"

[log]
access = "{workdir}/access.log"

[[listeners]]
name = "v4"
bind = "{VIP_V4}"
pool = "v4"

[[listeners]]
name = "v6"
bind = "{VIP_V6}"
pool = "v6"

[pools.v4]
source = "client"
send_proxy = "off"
connect_timeout = "2s"
retries = 0
balance = "roundrobin"
backends = [{{ address = "{BACKEND_V4}:8080" }}, {{ address = "{BACKEND_V4}:8081" }}]

[pools.v6]
source = "client"
send_proxy = "off"
connect_timeout = "2s"
retries = 0
balance = "roundrobin"
backends = [{{ address = "[{BACKEND_V6}]:8080" }}, {{ address = "[{BACKEND_V6}]:8081" }}]
"""


@dataclass
class Shape:
    spaces: Namespaces
    client: Namespace
    lb: Namespace
    backend: Namespace
    workdir: Path
    nginx_log: Path
    legacy_log: Path


@pytest.fixture(scope="module")
def shape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shape]:
    workdir = tmp_path_factory.mktemp("balancer-shape")
    spaces = new_spaces()
    try:
        c, lb, b = spaces.add("c"), spaces.add("lb"), spaces.add("b")
        spaces.link(c, "eth0", lb, "c0")
        spaces.link(lb, "b0", b, "eth0")
        spaces.addr(c, "eth0", f"{CLIENTS_V4[0]}/24", *(f"{a}/32" for a in CLIENTS_V4[1:]))
        spaces.addr(c, "eth0", f"{CLIENTS_V6[0]}/64", *(f"{a}/128" for a in CLIENTS_V6[1:]))
        c.ip("route", "add", "default", "via", "203.0.113.1")
        c.ip("-6", "route", "add", "default", "via", "2001:db8:c::1")
        spaces.addr(lb, "c0", "203.0.113.1/24", "2001:db8:c::1/64")
        spaces.addr(lb, "b0", "198.51.100.1/24", "2001:db8:b::1/64")
        spaces.addr(b, "eth0", f"{BACKEND_V4}/24", f"{BACKEND_V6}/64")
        b.ip("route", "add", "default", "via", "198.51.100.1")
        b.ip("-6", "route", "add", "default", "via", "2001:db8:b::1")
        binds = [f"{BACKEND_V4}:8080", f"[{BACKEND_V6}]:8080"]
        nginx_log = start_nginx(spaces, b, workdir, binds)
        legacy_log = start_legacy(
            spaces, b, workdir, [f"{BACKEND_V4}:8081", f"[{BACKEND_V6}]:8081"]
        )
        yield Shape(spaces, c, lb, b, workdir, nginx_log, legacy_log)
    finally:
        spaces.close()
        assert not spaces.left_behind(), spaces.left_behind()


def test_missing_return_routing_is_refused_with_the_commands(shape: Shape) -> None:
    proc = start_l4lb(
        shape.spaces, shape.lb, shape.workdir, "refused", config(shape.workdir, "check")
    )
    assert proc.wait(20) == 1
    log = shape.workdir / "refused.log"
    text = log.read_text()
    assert "Traceback" not in text
    commands = fixes(log)
    for backend in (BACKEND_V4, BACKEND_V6):
        for port in (8080, 8081):
            rule = f"from {backend} ipproto tcp sport {port} iif b0 lookup 100"
            assert any(rule in c for c in commands), (rule, text)
    assert "ip -4 route add local 0.0.0.0/0 dev lo table 100" in commands
    assert "ip -6 route add local ::/0 dev lo table 100" in commands


def test_legacy_backends_see_every_real_client(shape: Shape) -> None:
    lb_log = shape.workdir / "refused.log"
    if not lb_log.exists():  # run alone: get the commands from a refused start first
        start_l4lb(
            shape.spaces, shape.lb, shape.workdir, "refused", config(shape.workdir, "check")
        ).wait(20)
    commands = fixes(lb_log)
    assert commands
    for command in commands:  # exactly what l4lb said to run
        sh("ip", "netns", "exec", shape.lb.name, *command.split())
    proc = start_l4lb(shape.spaces, shape.lb, shape.workdir, "lb", config(shape.workdir, "check"))
    try:
        wait_started(proc, shape.workdir / "lb.log")
        for clients, vip in ((CLIENTS_V4, VIP_V4), (CLIENTS_V6, VIP_V6)):
            for client in clients:
                answers = [request(shape.client, client, vip, http_get(f"/{client}")) for _ in "ab"]
                # round robin: one went to nginx, one to the socketserver; each names the client
                nginx = [a for a in answers if a.startswith(b"HTTP/1.1 200")]
                legacy = [a for a in answers if a.startswith(f"peer {client}\n".encode())]
                assert len(nginx) == len(legacy) == 1, [a[:60] for a in answers]
                assert nginx[0].endswith(f"hello {client}\n".encode())
                # the socketserver answers after the client's FIN: 1 MiB, all of it
                assert len(legacy[0]) == len(f"peer {client}\n") + (1 << 20)
        every = set(CLIENTS_V4 + CLIENTS_V6)
        assert wait_for(lambda: {w[0] for w in log_words(shape.nginx_log)} >= every)
        assert wait_for(lambda: {w[0] for w in log_words(shape.legacy_log)} >= every)
        nginx_seen = {w[0] for w in log_words(shape.nginx_log)}
        legacy_seen = {w[0] for w in log_words(shape.legacy_log)}
        assert nginx_seen == every, nginx_seen  # no balancer address ever reached them
        assert legacy_seen == every, legacy_seen
        for words in log_words(shape.legacy_log):  # 1 MiB after the client's FIN, all of it
            assert words[2] == "8081"
        access = shape.workdir / "access.log"
        assert wait_for(lambda: len(json_lines(access)) >= 16)
        lines = json_lines(access)
        assert len(lines) == 16
        assert {line["end"] for line in lines} <= {"client_closed", "backend_closed"}
        assert {line["proxy"] for line in lines} == {"off"}
        (shape.workdir / "figures-balancer.json").write_text(
            json.dumps({"nginx": sorted(nginx_seen), "socketserver": sorted(legacy_seen)})
        )
    finally:
        stop_process(proc, 15)
