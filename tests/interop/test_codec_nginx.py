"""Headers from our encoder into real nginx (``listen ... proxy_protocol``), stream and http.

nginx must take our v1 and v2 headers, IPv4 and IPv6, and report the declared client address in
both its response (``$proxy_protocol_addr:$proxy_protocol_port``) and its access log.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from l4lb.proxy_protocol import (
    TLV,
    Command,
    Family,
    HeaderReader,
    ProxyHeader,
    TLVType,
    Transport,
    build,
    encode,
)
from tests.support.logs import complete_text
from tests.support.peers import NGINX_STREAM_MODULE, connect_from, free_port, have, nginx, wait_for

pytestmark = pytest.mark.skipif(not have("nginx"), reason="nginx is not installed")
HAVE_STREAM = Path(NGINX_STREAM_MODULE).exists()


@dataclass
class Rig:
    workdir: Path
    stream_port: int
    http_port: int
    send_port: int  # nginx stream -> capture listener with "proxy_protocol on"
    capture: socket.socket

    def log(self, name: str) -> str:
        return complete_text(self.workdir / name)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    workdir = tmp_path_factory.mktemp("nginx-codec")
    stream_port, http_port, send_port = free_port(), free_port(), free_port()
    capture = socket.socket()
    capture.bind(("127.0.0.1", 0))
    capture.listen(8)
    capture.settimeout(10)
    stream = f"""
  server {{
    listen 127.0.0.1:{send_port};
    proxy_pass 127.0.0.1:{capture.getsockname()[1]};
    proxy_protocol on;
  }}
  log_format pp 'PPLOG $proxy_protocol_addr:$proxy_protocol_port $remote_addr';
  server {{
    listen 127.0.0.1:{stream_port} proxy_protocol;
    access_log {{dir}}/stream.log pp;
    return "$proxy_protocol_addr:$proxy_protocol_port\\n";
  }}
"""
    http = f"""
  log_format pp 'PPLOG $proxy_protocol_addr:$proxy_protocol_port $remote_addr "$request"';
  server {{
    listen 127.0.0.1:{http_port} proxy_protocol;
    access_log {{dir}}/http.log pp;
    location / {{ return 200 "$proxy_protocol_addr:$proxy_protocol_port\\n"; }}
  }}
"""
    waits = [("127.0.0.1", http_port)]
    if HAVE_STREAM:
        waits += [("127.0.0.1", stream_port), ("127.0.0.1", send_port)]
    try:
        with nginx(workdir, stream=stream if HAVE_STREAM else "", http=http, wait=waits):
            yield Rig(workdir, stream_port, http_port, send_port, capture)
    finally:
        capture.close()


def _exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


CASES = [
    ("v1-tcp4", 1, ("127.0.0.9", 5101), ("127.0.0.10", 80), "127.0.0.9:5101"),
    ("v2-tcp4", 2, ("127.0.0.9", 5102), ("127.0.0.10", 80), "127.0.0.9:5102"),
    ("v1-tcp6", 1, ("fd00::9", 5103), ("fd00::10", 80), "fd00::9:5103"),
    ("v2-tcp6", 2, ("fd00::9", 5104), ("fd00::10", 80), "fd00::9:5104"),
    ("v2-mixed-v4-mapped", 2, ("127.0.0.9", 5105), ("::1", 80), "::ffff:127.0.0.9:5105"),
]
BY_CASE = pytest.mark.parametrize(
    ("name", "version", "src", "dst", "expected"), CASES, ids=[c[0] for c in CASES]
)


@pytest.mark.skipif(not HAVE_STREAM, reason="nginx stream module is not installed")
@pytest.mark.parametrize(
    ("name", "version", "src", "dst", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_stream_proxy_protocol(
    rig: Rig, name: str, version: int, src: tuple[str, int], dst: tuple[str, int], expected: str
) -> None:
    reply = _exchange(rig.stream_port, build(version, src, dst))
    assert reply.decode() == expected + "\n"
    assert wait_for(lambda: f"PPLOG {expected} 127.0.0.1" in rig.log("stream.log"), timeout=10)


@pytest.mark.parametrize(
    ("name", "version", "src", "dst", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_http_proxy_protocol(
    rig: Rig, name: str, version: int, src: tuple[str, int], dst: tuple[str, int], expected: str
) -> None:
    request = f"GET /{name} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    reply = _exchange(rig.http_port, build(version, src, dst) + request)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert body.decode() == expected + "\n"
    assert wait_for(
        lambda: f'PPLOG {expected} 127.0.0.1 "GET /{name} HTTP/1.1"' in rig.log("http.log"),
        timeout=10,
    )


def test_http_encode_with_tlvs_and_crc(rig: Rig) -> None:
    """nginx skips TLVs by the length field: an encoded header with TLVs and CRC32C works."""
    header = ProxyHeader(
        2,
        Command.PROXY,
        Family.INET,
        Transport.STREAM,
        ("127.0.0.9", 5106),
        ("127.0.0.10", 443),
        (TLV(TLVType.AUTHORITY, b"app.example"), TLV(TLVType.UNIQUE_ID, b"abc123")),
    )
    request = b"GET /tlv HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    reply = _exchange(rig.http_port, encode(header, crc32c=True) + request)
    assert reply.endswith(b"\r\n\r\n127.0.0.9:5106\n")


def test_http_rejects_malformed_header(rig: Rig) -> None:
    """A control: nginx does not accept everything, so the passes above mean something."""
    reply = _exchange(
        rig.http_port, b"PROXY TCP4 127.0.0.9 127.0.0.10 5107\r\nGET / HTTP/1.0\r\n\r\n"
    )
    assert b"127.0.0.9:5107" not in reply
    assert wait_for(lambda: "broken header" in rig.log("error.log"), timeout=10)


@pytest.mark.skipif(not HAVE_STREAM, reason="nginx stream module is not installed")
def test_nginx_sends_v1_we_parse(rig: Rig) -> None:
    """The other direction: nginx's ``proxy_protocol on`` (v1) into our HeaderReader."""
    client = connect_from("127.0.0.7", "127.0.0.1", rig.send_port)
    port = client.getsockname()[1]
    payload = b"hello from behind nginx\r\n"
    try:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        for _ in range(10):  # skip the connection nginx relayed for the readiness probe
            conn, _ = rig.capture.accept()
            reader = HeaderReader()
            with conn:
                conn.settimeout(10)
                while reader.header is None or not reader.trailing.endswith(payload):
                    chunk = conn.recv(7)  # small reads: the header arrives in pieces
                    if not chunk:
                        break
                    reader.feed(chunk)
            if reader.header is not None and reader.header.source == ("127.0.0.7", port):
                break
    finally:
        client.close()
    h = reader.header
    assert h is not None
    assert (h.version, h.family) == (1, Family.INET)
    assert h.source == ("127.0.0.7", port)
    assert h.destination == ("127.0.0.1", rig.send_port)
    assert reader.trailing == payload
