"""l4lb in front of a real HAProxy (``bind ... accept-proxy``): HAProxy logs each real client."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.support.l4lb import config_text, l4lb
from tests.support.logs import complete_lines, complete_text
from tests.support.peers import free_port, haproxy, have, wait_for

pytestmark = pytest.mark.skipif(not have("haproxy"), reason="haproxy is not installed")


def frontend(port: int) -> str:
    return f"""
frontend fe
    bind 127.0.0.1:{port} accept-proxy
    mode http
    log-format "client=%ci:%cp frontend=%fi:%fp uid=%[fc_pp_unique_id]"
    http-request return status 200 content-type text/plain lf-string "src=%[src]:%[src_port]\\n"
"""


def get(port: int, source: str) -> tuple[int, bytes]:
    with socket.socket() as s:
        s.settimeout(10)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        sport = s.getsockname()[1]
        s.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return sport, data


@pytest.mark.parametrize(
    ("version", "tlvs"),
    [("v1", []), ("v2", []), ("v2", ["unique_id", "crc32c", "noop"])],
)
def test_haproxy_sees_each_client(tmp_path: Path, version: str, tlvs: list[str]) -> None:
    hport, lport = free_port(), free_port()
    hdir = tmp_path / "haproxy"
    with haproxy(hdir, frontend(hport), wait=[("127.0.0.1", hport)]):
        log = hdir / "haproxy.log"
        before = complete_text(log).count("client=")
        text = config_text(
            f"127.0.0.1:{lport}",
            [f"127.0.0.1:{hport}"],
            pool={"send_proxy": version, "proxy_tlvs": tlvs},
        )
        with l4lb(tmp_path / "lb", text) as lb:
            seen = []
            for i in range(3):
                source = f"127.0.0.{21 + i}"
                sport, data = get(lport, source)
                assert data.startswith(b"HTTP/1.1 200")
                assert data.endswith(f"src={source}:{sport}\n".encode())
                seen.append(f"client={source}:{sport} frontend=127.0.0.1:{lport}")
            assert wait_for(lambda: complete_text(log).count("client=") >= before + 3)
            lines = [ln for ln in complete_lines(log) if "client=" in ln]
            assert [ln.partition(" uid=")[0] for ln in lines[before:]] == seen
            # HAProxy checked the CRC32C and saw the same unique id as our access log
            uids = [ln.partition(" uid=")[2] for ln in lines[before:]]
            if "unique_id" in tlvs:
                assert uids == [line["unique_id"] for line in lb.wait_access(3)]
            else:
                assert uids == ["-"] * 3
