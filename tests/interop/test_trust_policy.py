"""allow/deny and both per-client limits on real connections through the balancer, each client a
distinct 127.x source (and, behind a trusted proxy, the real client the header names)."""

from __future__ import annotations

import re
import socket
import urllib.request
from pathlib import Path

from tests.support.echo_backend import EchoBackend
from tests.support.l4lb import l4lb
from tests.support.peers import connect_from, free_port, wait_for


def config(backend: str, ports: dict[str, int], deny_file: Path) -> str:
    return f"""
workers = 1
[log]
access = "access.log"

[admin]
bind = "127.0.0.1:{ports["admin"]}"

[[listeners]]
name = "acl"
bind = "127.0.0.1:{ports["acl"]}"
pool = "echo"
allow = ["127.0.0.0/24"]
deny = ["127.0.0.66/32"]
deny_file = "{deny_file}"

[[listeners]]
name = "edge"
bind = "127.0.0.1:{ports["edge"]}"
pool = "echo"
accept_proxy = "required"
trusted_proxies = ["127.0.0.1/32"]
deny = ["198.51.100.0/24"]

[[listeners]]
name = "conns"
bind = "127.0.0.1:{ports["conns"]}"
pool = "echo"
max_conns_per_client = 2

[[listeners]]
name = "rate"
bind = "127.0.0.1:{ports["rate"]}"
pool = "echo"
new_conns_per_client = "1/m"
new_conns_burst = 3

[pools.echo]
send_proxy = "off"
backends = [{{ address = "{backend}" }}]
"""


def served(sock: socket.socket) -> bool:
    """True if the echo backend greeted this connection; False if the balancer closed it.

    The echo backend speaks after the client's first bytes: send some."""
    sock.settimeout(10)
    try:
        sock.sendall(b"hi")
        return sock.recv(5) == b"echo\n"
    except (ConnectionResetError, BrokenPipeError):
        return False


def attempt(source: str, port: int, first: bytes = b"") -> bool:
    with connect_from(source, "127.0.0.1", port) as sock:
        if first:
            sock.sendall(first)
        return served(sock)


def test_allow_deny_and_limits_on_real_connections(tmp_path: Path) -> None:
    deny_file = tmp_path / "deny.txt"
    deny_file.write_text("# from a feed\n127.0.0.77\n10.0.0.0/8\n")
    ports = {name: free_port() for name in ("acl", "edge", "conns", "rate", "admin")}
    with (
        EchoBackend("echo") as backend,
        l4lb(tmp_path / "lb", config(backend.address, ports, deny_file)) as lb,
    ):
        # allow / deny / deny_file, on the socket's own client
        assert attempt("127.0.0.5", ports["acl"])
        assert not attempt("127.0.0.66", ports["acl"])  # deny
        assert not attempt("127.0.0.77", ports["acl"])  # deny_file
        assert not attempt("127.0.1.5", ports["acl"])  # outside allow

        # behind a trusted proxy, deny applies to the real client from the header
        claim = b"PROXY TCP4 %s 203.0.113.7 40000 443\r\n"
        assert not attempt("127.0.0.1", ports["edge"], claim % b"198.51.100.42")
        assert attempt("127.0.0.1", ports["edge"], claim % b"192.0.2.42")

        # max_conns_per_client: two open from 127.0.0.30, the third refused, others unaffected
        held = [connect_from("127.0.0.30", "127.0.0.1", ports["conns"]) for _ in range(2)]
        try:
            assert all(served(sock) for sock in held)
            assert not attempt("127.0.0.30", ports["conns"])
            assert attempt("127.0.0.31", ports["conns"])
            held.pop().close()  # a slot comes back once the balancer sees the close
            assert wait_for(lambda: attempt("127.0.0.30", ports["conns"]), 10, interval=0.2)
        finally:
            for sock in held:
                sock.close()

        # new_conns_per_client: a burst of 3, then refused; another client has its own bucket
        results = [attempt("127.0.0.40", ports["rate"]) for _ in range(4)]
        assert results == [True, True, True, False]
        assert attempt("127.0.0.41", ports["rate"])

        expected = {
            ("acl", "127.0.0.66", "denied"),
            ("acl", "127.0.0.77", "denied"),
            ("acl", "127.0.1.5", "not_allowed"),
            ("edge", "198.51.100.42", "denied"),
            ("conns", "127.0.0.30", "over_conn_limit"),
            ("rate", "127.0.0.40", "over_rate_limit"),
        }

        def rejections() -> set[tuple[str, str, str]]:
            return {
                (line["listener"], line["client"].rsplit(":", 1)[0], line["reason"])
                for line in lb.access_lines()
                if line["event"] == "rejected"
            }

        assert wait_for(lambda: rejections() >= expected, 10), rejections()
        assert rejections() == expected
        edge = [
            line
            for line in lb.access_lines()
            if line["listener"] == "edge" and line["event"] == "rejected"
        ]
        assert edge[0]["peer"].startswith("127.0.0.1:")  # the proxy it came through

        # the counters, as the admin endpoint exports them
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['admin']}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        exported = {
            (m[0], m[1]): float(m[2])
            for m in re.findall(
                r'^l4lb_rejections_total\{listener="(\w+)",reason="(\w+)"\} (\S+)$',
                metrics,
                re.M,
            )
        }
        over_conn = exported.pop(("conns", "over_conn_limit"))
        assert over_conn >= 1  # and more if a retry above came before the close was seen
        assert exported == {
            ("acl", "denied"): 2,
            ("acl", "not_allowed"): 1,
            ("edge", "denied"): 1,
            ("rate", "over_rate_limit"): 1,
        }


def test_reload_rereads_the_deny_file(tmp_path: Path) -> None:
    deny_file = tmp_path / "deny.txt"
    deny_file.write_text("127.0.0.66\n")
    ports = {name: free_port() for name in ("acl", "edge", "conns", "rate", "admin")}
    with (
        EchoBackend("echo") as backend,
        l4lb(tmp_path / "lb", config(backend.address, ports, deny_file)) as lb,
    ):
        assert attempt("127.0.0.88", ports["acl"])
        deny_file.write_text("127.0.0.66\n127.0.0.88/32  # added later\n")
        lb.reload()
        assert not attempt("127.0.0.88", ports["acl"])
        assert attempt("127.0.0.89", ports["acl"])
        # a broken deny file is refused by the reload; the running policy stays
        deny_file.write_text("127.0.0.300\n")
        lb.reload()
        assert "deny.txt:1" in lb.log_text()
        assert not attempt("127.0.0.88", ports["acl"])
