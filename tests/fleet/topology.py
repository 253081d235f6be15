"""The fleet topology: a client, a BIRD 2 router with ECMP, l4lb nodes, a switch, an nginx backend.

::

    client (203.0.113.130-169) --- router (BIRD, AS 65000, ECMP, L4 hash)
                                     |  203.0.113.4i-3 <-> 203.0.113.4i-2  (/30, one per node)
                                 node i (l4lb + ExaBGP, AS 65010, VIP 192.0.2.10 on lo)
                                     |  198.51.100.10+i /24  (the fleet link: a bridge)
                                 backend (nginx, 198.51.100.100:8080, PROXY protocol)

Only documentation addresses, only inside namespaces this module creates.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.netns import Namespace, Namespaces, write_nginx_conf
from tests.support.peers import wait_for

VIP = "192.0.2.10"
PORT = 80
BACKEND = "198.51.100.100"
BACKEND_PORT = 8080
ROUTER_AS = 65000
NODE_AS = 65010
CLIENTS = [f"203.0.113.{130 + i}" for i in range(40)]
MAX_NODES = 4
ROUTER_SYSCTLS = (
    "net.ipv4.ip_forward=1",
    "net.ipv4.fib_multipath_hash_policy=1",  # ECMP on the 4-tuple, not the addresses only
    "net.ipv4.conf.all.rp_filter=2",  # an owner answers through a link the VIP route left
    "net.ipv4.conf.default.rp_filter=2",
)


def router_addr(i: int) -> str:
    return f"203.0.113.{4 * i - 3}"


def node_addr(i: int) -> str:
    return f"203.0.113.{4 * i - 2}"


def fleet_addr(i: int) -> str:
    return f"198.51.100.{10 + i}"


def bird_config(workdir: Path) -> str:
    lines = [
        f'log "{workdir}/bird.log" all;',
        f"router id {router_addr(1)};",
        "protocol device { scan time 10; }",
        "protocol kernel {",
        "    ipv4 { import none; export all; };",
        "    merge paths on;",  # BIRD 2 installs one path without it
        "}",
    ]
    for i in range(1, MAX_NODES + 1):
        lines += [
            f"protocol bgp node{i} {{",
            f"    local {router_addr(i)} as {ROUTER_AS};",
            f"    neighbor {node_addr(i)} as {NODE_AS};",
            "    hold time 3; keepalive time 1;",
            "    connect retry time 1; error wait time 1, 2;",
            "    ipv4 { import all; export none; };",  # eBGP needs explicit filters
            "}",
        ]
    return "\n".join(lines) + "\n"


def node_config(i: int, nodes: int, workdir: Path) -> str:
    peers = [fleet_addr(j) for j in range(1, MAX_NODES + 1) if j != i]
    return f"""\
workers = 1
drain_timeout = "15s"
relay = "stream"

[log]
access = "{workdir}/access{i}.log"

[admin]
bind = "127.0.0.1:9100"

[[listeners]]
name = "web"
bind = "0.0.0.0:{PORT}"
pool = "web"

[pools.web]
balance = "maglev"
send_proxy = "v1"
backends = [
    {{ address = "{BACKEND}:{BACKEND_PORT}" }},
    {{ address = "{BACKEND}:{BACKEND_PORT + 1}" }},
]

[pools.web.health]
check = "tcp"
interval = "250ms"
rise = 1
fall = 2

[anycast]
vips = ["{VIP}/32"]
local_as = {NODE_AS}
router_id = "{node_addr(i)}"
neighbors = [{{ address = "{router_addr(i)}", remote_as = {ROUTER_AS} }}]
peers = {json.dumps(peers)}
hold_time = 3
withdraw_grace = "1s"
"""


NGINX_HTTP = """\
    log_format real '$proxy_protocol_addr $proxy_protocol_port $remote_addr $server_port '
                    '$request_uri';
    keepalive_requests 100000;
    keepalive_timeout 120s;
    server {{
        listen {backend}:{port} proxy_protocol;
        listen {backend}:{port2} proxy_protocol;
        access_log {dir}/backend.log real;
        location / {{ return 200 "ok $server_port\\n"; }}
    }}"""
"""The backend: nginx with PROXY protocol, logging the client it names and the node it came from."""


@dataclass
class Node:
    index: int
    ns: Namespace
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=Path)


class Fleet:
    """The namespaces and processes of one fleet test."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.spaces = Namespaces("l4f")
        self.nodes: dict[int, Node] = {}
        # l4lb's private directory (ExaBGP's config and socket) goes here, not in /tmp: a node
        # killed with SIGKILL cannot remove it. Short, for the Unix socket's 108-byte limit.
        self.tmp = Path(f"/tmp/l4f-{self.spaces.run}")
        self.tmp.mkdir(exist_ok=True)
        self.bird: subprocess.Popen[bytes] | None = None
        self.nginx: subprocess.Popen[bytes]

    # -- build -----------------------------------------------------------------------------

    def build(self) -> None:
        sp = self.spaces
        self.router = sp.add("r")
        self.client = sp.add("c")
        self.switch = sp.add("sw")
        self.backend = sp.add("b")
        r, c, sw, b = self.router, self.client, self.switch, self.backend
        for key in ROUTER_SYSCTLS:
            r.sysctl(*key.split("="))
        sp.link(r, "c0", c, "eth0")
        r.ip("addr", "add", "203.0.113.129/25", "dev", "c0")
        for k, addr in enumerate(CLIENTS):
            c.ip("addr", "add", f"{addr}/25" if k == 0 else f"{addr}/32", "dev", "eth0")
        c.ip("route", "add", "default", "via", "203.0.113.129")
        sw.ip("link", "add", "br0", "type", "bridge")
        sw.ip("link", "set", "br0", "up")
        sp.link(sw, "pb", b, "fl")
        sw.ip("link", "set", "pb", "master", "br0")
        b.ip("addr", "add", f"{BACKEND}/24", "dev", "fl")
        http = NGINX_HTTP.format(
            dir=self.workdir, backend=BACKEND, port=BACKEND_PORT, port2=BACKEND_PORT + 1
        )
        self.nginx_conf = write_nginx_conf(self.workdir, http)
        self.start_backend()
        (self.workdir / "bird.conf").write_text(bird_config(self.workdir))
        for i in range(1, MAX_NODES + 1):
            sp.link(r, f"n{i}", self._node_ns(i), "upl")
            r.ip("addr", "add", f"{router_addr(i)}/30", "dev", f"n{i}")
            self.wire_node(i)
        self.bird = sp.start(
            r,
            ["bird", "-f", "-c", str(self.workdir / "bird.conf"),
             "-s", str(self.workdir / "bird.ctl"), "-P", str(self.workdir / "bird.pid")],
            self.workdir / "bird.out",
        )  # fmt: skip
        assert wait_for(lambda: b.port_open(BACKEND, BACKEND_PORT), 10), "nginx not up"

    def start_backend(self) -> None:
        args = ["nginx", "-p", str(self.workdir), "-c", str(self.nginx_conf)]
        self.nginx = self.spaces.start(self.backend, args, self.workdir / "nginx.out")

    def stop_backend(self) -> None:
        self.nginx.kill()
        self.nginx.wait(10)

    def _node_ns(self, i: int) -> Namespace:
        """Node i's namespace, wired (not yet running l4lb)."""
        ns = self.spaces.add(f"n{i}")
        for key in ("net.ipv4.conf.all.rp_filter=2", "net.ipv4.conf.default.rp_filter=2"):
            ns.sysctl(*key.split("="))
        ns.ip("addr", "add", f"{VIP}/32", "dev", "lo")
        self.spaces.link(self.switch, f"p{i}", ns, "fl")
        self.switch.ip("link", "set", f"p{i}", "master", "br0")
        ns.ip("addr", "add", f"{fleet_addr(i)}/24", "dev", "fl")
        self.nodes[i] = Node(i, ns)
        return ns

    def wire_node(self, i: int) -> None:
        """The node's uplink address and default route (after the link exists)."""
        ns = self.nodes[i].ns
        ns.ip("addr", "add", f"{node_addr(i)}/30", "dev", "upl")
        ns.ip("route", "add", "default", "via", router_addr(i))

    # -- l4lb nodes ------------------------------------------------------------------------

    def start_node(self, i: int) -> Node:
        node = self.nodes[i]
        conf = self.workdir / f"node{i}.toml"
        conf.write_text(node_config(i, len(self.nodes), self.workdir))
        starts = len(list(self.workdir.glob(f"node{i}*.log")))
        node.log = self.workdir / (f"node{i}.log" if not starts else f"node{i}-{starts + 1}.log")
        node.proc = self.spaces.start(
            node.ns,
            [sys.executable, "-m", "l4lb.cli", "run", "--config", str(conf)],
            node.log,
            env={**os.environ, "TMPDIR": str(self.tmp)},
        )
        return node

    def sigterm(self, i: int) -> None:
        proc = self.nodes[i].proc
        assert proc is not None
        proc.terminate()

    def sigkill(self, i: int) -> None:
        proc = self.nodes[i].proc
        assert proc is not None
        proc.kill()
        proc.wait(10)

    # -- reading the fleet -----------------------------------------------------------------

    def router_nexthops(self) -> set[str]:
        """The gateways of the router's kernel route to the VIP."""
        out = self.router.ip("-j", "route", "show", f"{VIP}/32")
        routes = json.loads(out or "[]")
        hops: set[str] = set()
        for route in routes:
            if "gateway" in route:
                hops.add(route["gateway"])
            for hop in route.get("nexthops", []):
                hops.add(hop["gateway"])
        return hops

    def wait_nexthops(self, want: set[str], timeout: float = 60.0) -> float:
        """Wait until the router's route is exactly ``want``; seconds waited (or AssertionError).

        60 s: an upper bound on the event, not an expected time (the wait ends as soon as the
        route is right); a machine loaded by other work once took longer than the former 20 s."""
        start = time.monotonic()
        ok = wait_for(lambda: self.router_nexthops() == want, timeout, 0.005)
        assert ok, f"router next hops {self.router_nexthops()} != {want}"
        return time.monotonic() - start

    def _http(self, i: int, method: str, path: str) -> tuple[int, bytes]:
        """One request to node ``i``'s admin API (from inside its namespace): status, body."""
        s = self.nodes[i].ns.socket()
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", 9100))
            s.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:9100\r\nConnection: close\r\n"
                      "Content-Length: 0\r\n\r\n".encode())  # fmt: skip
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        finally:
            s.close()
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    def admin(self, i: int, method: str, path: str) -> tuple[int, dict[str, object]]:
        status, body = self._http(i, method, path)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, {"text": body.decode(errors="replace")}

    def status(self, i: int) -> dict[str, object]:
        return self.admin(i, "GET", "/status")[1]

    def metrics(self, i: int) -> str:
        return self._http(i, "GET", "/metrics")[1].decode()

    def client_socket(self, source: str) -> socket.socket:
        s = self.client.socket()
        s.bind((source, 0))
        return s

    def backend_lines(self) -> list[list[str]]:
        """nginx's log, complete lines only: [client, client port, node, backend port, uri]."""
        path = self.workdir / "backend.log"
        if not path.exists():
            return []
        text = path.read_text()
        lines = text.split("\n")[:-1]  # a partial last line is still being written
        return [line.split() for line in lines if line]

    def close(self) -> list[str]:
        try:
            return self.spaces.close()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
