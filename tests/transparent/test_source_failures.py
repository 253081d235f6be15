"""When a backend connection cannot come from its ``source``: the reason is logged, the client
is never left hanging, a mixed pool moves on to a PROXY backend; a fixed ``source`` address
(HAProxy's ``source ADDR``); start and reload refuse what the host lacks. A real ``l4lb run``."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from l4lb.proxy_protocol import ProxyHeader
from tests.balancer.helpers import backend, connect, hello, recv_all
from tests.support.l4lb import config_text, l4lb, start_l4lb
from tests.support.netns import needs_root
from tests.support.peers import free_port, stop_process, wait_for
from tests.transparent.topology import fixes

pytestmark = needs_root


def peer_and_echo(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
    """Say what the socket's peer is, then echo until EOF."""
    sock.sendall(f"peer={sock.getpeername()[0]}\n".encode() + early + recv_all(sock))


def test_mixed_pool_moves_on_to_the_proxy_backend(tmp_path: Path) -> None:
    with backend(peer_and_echo, host="::1", proxy=False) as v6, backend(hello) as proxied:
        port = free_port()
        text = config_text(
            f"127.0.0.1:{port}",
            [
                {"address": v6.address, "source": "client", "send_proxy": "off"},
                {"address": proxied.address},
            ],
            top={"transparent_routing": "off"},
            pool={"retries": 1},
        )
        with l4lb(tmp_path, text) as lb:
            for _ in range(2):  # round robin: the transparent backend is tried first once
                client = connect(port, "127.0.0.21")
                client.sendall(b"x")
                client.shutdown(socket.SHUT_WR)
                expected = f"client={('127.0.0.21', client.getsockname()[1])}\nx"
                assert recv_all(client) == expected.encode()  # via PROXY, the real client
                client.close()
            assert wait_for(lambda: "is IPv4, the backend is IPv6" in lb.log_text())
            assert not v6.seen  # an IPv4 client cannot come from its address to an IPv6 server
            lines = lb.wait_access(2)
            assert [line["end"] for line in lines] == ["client_closed", "client_closed"]
            assert [line["proxy"] for line in lines] == ["v2", "v2"]


def test_no_way_to_the_backend_from_the_client_is_source_failed(tmp_path: Path) -> None:
    with backend(peer_and_echo, host="::1", proxy=False) as v6:
        port = free_port()
        text = config_text(
            f"127.0.0.1:{port}",
            [v6.address],
            top={"transparent_routing": "off"},
            pool={"source": "client", "send_proxy": "off"},
        )
        with l4lb(tmp_path, text) as lb:
            client = connect(port, "127.0.0.22")
            with pytest.raises(ConnectionResetError):  # refused at once, not left hanging
                client.recv(10)
            client.close()
            (line,) = lb.wait_access(1)
            assert line["end"] == "source_failed"
            assert "cannot bind source" not in line["detail"]
            assert "source 127.0.0.22 is IPv4, the backend is IPv6" in line["detail"]


def test_fixed_source_address(tmp_path: Path) -> None:
    with backend(peer_and_echo, proxy=False) as be:
        port = free_port()
        text = config_text(
            f"127.0.0.1:{port}", [be.address], pool={"source": "127.0.0.5", "send_proxy": "off"}
        )
        with l4lb(tmp_path, text) as lb:
            client = connect(port, "127.0.0.23")
            client.sendall(b"y")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"peer=127.0.0.5\ny"  # HAProxy's "source ADDR"
            client.close()
            (line,) = lb.wait_access(1)
            assert line["end"] == "client_closed"


def test_fixed_source_that_is_not_local_is_refused_at_start(tmp_path: Path) -> None:
    text = config_text(
        f"127.0.0.1:{free_port()}", ["127.0.0.1:9"], pool={"source": "198.51.100.77"}
    )
    lb = start_l4lb(tmp_path, text, wait=False)
    try:
        assert lb.proc.wait(20) == 1
    finally:
        stop_process(lb.proc)
    log = lb.log_text()
    assert "source 198.51.100.77 cannot be bound on this host" in log
    assert fixes(tmp_path / "l4lb.log") == ["ip addr add 198.51.100.77/32 dev IFACE"]
    assert "Traceback" not in log


def test_reload_adding_a_transparent_backend_without_routing_is_rejected(tmp_path: Path) -> None:
    with backend(peer_and_echo, proxy=False) as be:
        port = free_port()
        plain = config_text(f"127.0.0.1:{port}", [be.address], pool={"send_proxy": "off"})
        with l4lb(tmp_path, plain) as lb:
            transparent = config_text(
                f"127.0.0.1:{port}",
                [be.address],
                pool={"source": "client", "send_proxy": "off"},
            )
            lb.reload(transparent)
            assert wait_for(lambda: "event=reload_rejected fix=" in lb.log_text())
            log = lb.log_text()
            rule = f"ip -4 rule add pref 100 from 127.0.0.1 ipproto tcp sport {be.port} iif lo"
            assert rule in log
            client = connect(port, "127.0.0.24")  # the running config serves on
            client.sendall(b"z")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"peer=127.0.0.1\nz"
            client.close()


def test_without_the_capability_the_start_is_refused(tmp_path: Path) -> None:
    """Run as nobody with no capabilities (setpriv): refused, saying which capability."""
    shared = Path(tempfile.mkdtemp(prefix="l4t-cap-"))
    try:
        shared.chmod(0o755)
        path = shared / "l4lb.toml"
        path.write_text(
            config_text(
                f"127.0.0.1:{free_port()}",
                ["127.0.0.1:9"],
                top={"transparent_routing": "off"},
                pool={"source": "client", "send_proxy": "off"},
                access_log="off",
            )
        )
        path.chmod(0o644)
        args = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
        done = subprocess.run(
            [*args, sys.executable, "-m", "l4lb", "run", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    assert done.returncode == 1, done.stderr
    assert "needs CAP_NET_ADMIN" in done.stderr
    assert "AmbientCapabilities=CAP_NET_ADMIN" in done.stderr
    assert "Traceback" not in done.stderr


def test_with_several_workers_the_refusal_comes_once(tmp_path: Path) -> None:
    """The supervisor refuses before forking: no worker starts, fails and is restarted."""
    text = config_text(
        f"127.0.0.1:{free_port()}",
        ["127.0.0.1:9"],
        top={"workers": 2},
        pool={"source": "client", "send_proxy": "off"},
    )
    lb = start_l4lb(tmp_path, text, wait=False)
    try:
        assert lb.proc.wait(20) == 1
    finally:
        stop_process(lb.proc)
    log = lb.log_text()
    assert "workers_start" not in log
    rule = "ip -4 rule add pref 100 from 127.0.0.1 ipproto tcp sport 9 iif lo lookup 100"
    assert fixes(tmp_path / "l4lb.log")[0] == rule  # then the table's route, unless present


def test_an_ipv4_client_of_a_dual_stack_listener_is_bound_as_ipv4(tmp_path: Path) -> None:
    with backend(peer_and_echo, proxy=False) as be:
        port = free_port()
        text = config_text(
            f"[::]:{port}",
            [be.address],
            top={"transparent_routing": "off"},
            pool={"source": "client", "send_proxy": "off"},
        )
        with l4lb(tmp_path, text) as lb:
            client = connect(port, "127.0.0.25")  # accepted as ::ffff:127.0.0.25
            client.sendall(b"w")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"peer=127.0.0.25\nw"
            client.close()
            (line,) = lb.wait_access(1)
            assert line["end"] == "client_closed"
