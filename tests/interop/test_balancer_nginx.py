"""l4lb in front of a real nginx (``listen ... proxy_protocol``): nginx logs each real client."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.support.l4lb import config_text, l4lb
from tests.support.logs import complete_lines
from tests.support.peers import free_port, have, nginx, wait_for

pytestmark = pytest.mark.skipif(not have("nginx"), reason="nginx is not installed")

CLIENTS = ["127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"]


# what the header said: the client, the destination it connected to; and who sent it
LOG_FORMAT = (
    "'$proxy_protocol_addr:$proxy_protocol_port "
    "-> $proxy_protocol_server_addr:$proxy_protocol_server_port via $remote_addr'"
)


def stream_server(listen: str) -> str:
    return f"""
  log_format pp {LOG_FORMAT};
  server {{
    listen {listen} proxy_protocol;
    access_log {{dir}}/access.log pp;
    return "ok $proxy_protocol_addr\\n";
  }}
"""


def ask(host: str, port: int, source: str) -> tuple[str, bytes]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.bind((source, 0))
        s.connect((host, port))
        src = s.getsockname()
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    shown = f"[{src[0]}]" if ":" in src[0] else src[0]
    return f"{shown}:{src[1]}", data


def logged(workdir: Path) -> list[str]:
    lines = complete_lines(workdir / "access.log")
    return [ln for ln in lines if not ln.startswith("-:-")]  # the helper's readiness probe


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_nginx_sees_each_client_ipv4(tmp_path: Path, version: str) -> None:
    nport, lport = free_port(), free_port()
    ndir = tmp_path / "nginx"
    with nginx(ndir, stream=stream_server(f"127.0.0.1:{nport}"), wait=[("127.0.0.1", nport)]):
        text = config_text(
            f"127.0.0.1:{lport}", [f"127.0.0.1:{nport}"], pool={"send_proxy": version}
        )
        with l4lb(tmp_path / "lb", text) as lb:
            expected = []
            for source in CLIENTS:
                client, answer = ask("127.0.0.1", lport, source)
                assert answer == f"ok {source}\n".encode()
                expected.append(f"{client} -> 127.0.0.1:{lport} via 127.0.0.1")
            assert wait_for(lambda: len(logged(ndir)) >= len(CLIENTS))
            assert logged(ndir) == expected
            lines = lb.wait_access(len(CLIENTS))
            assert [line["proxy"] for line in lines] == [version] * len(CLIENTS)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_nginx_sees_ipv6_client(tmp_path: Path, version: str) -> None:
    nport, lport = free_port("::1"), free_port("::1")
    ndir = tmp_path / "nginx"
    with nginx(ndir, stream=stream_server(f"[::1]:{nport}"), wait=[("::1", nport)]):
        text = config_text(f"[::1]:{lport}", [f"[::1]:{nport}"], pool={"send_proxy": version})
        with l4lb(tmp_path / "lb", text):
            client, answer = ask("::1", lport, "::1")
            assert answer == b"ok ::1\n"
            assert wait_for(lambda: len(logged(ndir)) >= 1)
            port = client.rpartition(":")[2]
            assert logged(ndir) == [f"::1:{port} -> ::1:{lport} via ::1"]


def test_ipv6_client_to_ipv4_backend(tmp_path: Path) -> None:
    nport, lport = free_port(), free_port("::1")
    ndir = tmp_path / "nginx"
    with nginx(ndir, stream=stream_server(f"127.0.0.1:{nport}"), wait=[("127.0.0.1", nport)]):
        text = config_text(f"[::1]:{lport}", [f"127.0.0.1:{nport}"], pool={"send_proxy": "v2"})
        with l4lb(tmp_path / "lb", text):
            client, answer = ask("::1", lport, "::1")
            assert answer == b"ok ::1\n"  # the header is TCP6 although the backend is IPv4
            assert wait_for(lambda: len(logged(ndir)) >= 1)
            port = client.rpartition(":")[2]
            assert logged(ndir) == [f"::1:{port} -> ::1:{lport} via 127.0.0.1"]


def test_ipv4_client_on_ipv6_listener_is_sent_as_v4_mapped_tcp6(tmp_path: Path) -> None:
    # A v4-mapped bind is an IPv6 socket that only takes IPv4 connections to 127.0.0.1.
    nport, lport = free_port(), free_port()
    ndir = tmp_path / "nginx"
    with nginx(ndir, stream=stream_server(f"127.0.0.1:{nport}"), wait=[("127.0.0.1", nport)]):
        text = config_text(
            f"[::ffff:127.0.0.1]:{lport}", [f"127.0.0.1:{nport}"], pool={"send_proxy": "v2"}
        )
        with l4lb(tmp_path / "lb", text):
            client, answer = ask("127.0.0.1", lport, "127.0.0.15")
            assert answer == b"ok ::ffff:127.0.0.15\n"
            assert wait_for(lambda: len(logged(ndir)) >= 1)
            port = client.rpartition(":")[2]
            assert logged(ndir) == [
                f"::ffff:127.0.0.15:{port} -> ::ffff:127.0.0.1:{lport} via 127.0.0.1"
            ]
