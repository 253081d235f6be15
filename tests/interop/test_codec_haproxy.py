"""The codec against real HAProxy, both ways.

HAProxy -> us: ``send-proxy``, ``send-proxy-v2`` and ``send-proxy-v2`` with
``proxy-v2-options unique-id,authority,crc32c`` connect to a listener in this test; we parse
what arrived and check the client address and the TLVs (the CRC32C is verified by the parser).
Us -> HAProxy: headers from ``encode``/``build`` go to ``bind ... accept-proxy``; HAProxy's log
(``%ci:%cp %fi:%fp``) must show the addresses we declared.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
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
    local_header,
)
from tests.support.logs import complete_text
from tests.support.peers import connect_from, free_port, haproxy, have, wait_for

pytestmark = pytest.mark.skipif(not have("haproxy"), reason="haproxy is not installed")

CLIENT_IP = "127.0.0.7"
PAYLOAD = b"hello through haproxy\r\n"


def _listener(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, 0))
    s.listen(16)
    s.settimeout(10)
    return s


def _read_all(conn: socket.socket) -> bytes:
    conn.settimeout(10)
    chunks = []
    while True:
        data = conn.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


@dataclass
class Rig:
    workdir: Path
    ports: dict[str, int]
    listeners: dict[str, socket.socket]

    def log(self) -> str:
        return complete_text(self.workdir / "haproxy.log")


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    workdir = tmp_path_factory.mktemp("haproxy-codec")
    listeners = {name: _listener() for name in ("v1", "v2", "v2x", "v6", "sink")}
    listeners["v6"].close()
    listeners["v6"] = _listener("::1")
    lp = {name: s.getsockname()[1] for name, s in listeners.items()}
    ports = {name: free_port() for name in ("fe_v1", "fe_v2", "fe_v2x", "fe_accept")}
    ports["fe_v6"] = free_port("::1")
    body = f"""
frontend fe_v1
    bind 127.0.0.1:{ports["fe_v1"]}
    default_backend be_v1
backend be_v1
    server s 127.0.0.1:{lp["v1"]} send-proxy

frontend fe_v2
    bind 127.0.0.1:{ports["fe_v2"]}
    default_backend be_v2
backend be_v2
    server s 127.0.0.1:{lp["v2"]} send-proxy-v2

frontend fe_v6
    bind [::1]:{ports["fe_v6"]}
    default_backend be_v6
backend be_v6
    server s [::1]:{lp["v6"]} send-proxy-v2

frontend fe_v2x
    bind 127.0.0.1:{ports["fe_v2x"]} accept-proxy
    unique-id-format L4LB-%ci-%cp
    default_backend be_v2x
backend be_v2x
    server s 127.0.0.1:{lp["v2x"]} send-proxy-v2 proxy-v2-options unique-id,authority,crc32c

frontend fe_accept
    bind 127.0.0.1:{ports["fe_accept"]} accept-proxy
    log-format "PPLOG %ci:%cp %fi:%fp"
    default_backend be_sink
backend be_sink
    server s 127.0.0.1:{lp["sink"]}
"""
    waits = [("127.0.0.1", p) for k, p in ports.items() if k != "fe_v6"] + [("::1", ports["fe_v6"])]
    try:
        with haproxy(workdir, body, wait=waits):
            # wait_port's probes reached HAProxy and were relayed: drain those connections.
            for s in listeners.values():
                _drain_pending(s)
            yield Rig(workdir, ports, listeners)
    finally:
        for s in listeners.values():
            s.close()


def _drain_pending(listener: socket.socket) -> None:
    listener.settimeout(0.3)
    try:
        while True:
            conn, _ = listener.accept()
            conn.close()
    except OSError:
        pass
    finally:
        listener.settimeout(10)


def _through_haproxy(
    rig: Rig, frontend: str, listener: str, prefix: bytes = b""
) -> tuple[HeaderReader, tuple[str, int]]:
    """Connect as a client, send (prefix +) PAYLOAD, capture what HAProxy sends the backend."""
    fe_host = "::1" if frontend == "fe_v6" else "127.0.0.1"
    client_ip = "::1" if frontend == "fe_v6" else CLIENT_IP
    client = connect_from(client_ip, fe_host, rig.ports[frontend])
    try:
        client_addr = client.getsockname()[:2]
        client.sendall(prefix + PAYLOAD)
        client.shutdown(socket.SHUT_WR)
        # Skip any late connection HAProxy relays for the fixture's readiness probes: ours is
        # the one that carries PAYLOAD.
        for _ in range(10):
            conn, _ = rig.listeners[listener].accept()
            with conn:
                received = _read_all(conn)
            if received.endswith(PAYLOAD):
                break
    finally:
        client.close()
    reader = HeaderReader()
    # Feed in small pieces, as a socket would hand them over.
    for i in range(0, len(received), 5):
        reader.feed(received[i : i + 5])
    assert reader.header is not None, received
    return reader, client_addr


def test_haproxy_send_proxy_v1(rig: Rig) -> None:
    reader, client = _through_haproxy(rig, "fe_v1", "v1")
    h = reader.header
    assert h is not None
    assert (h.version, h.family, h.transport) == (1, Family.INET, Transport.STREAM)
    assert h.source == (CLIENT_IP, client[1])
    assert h.destination == ("127.0.0.1", rig.ports["fe_v1"])
    assert reader.trailing == PAYLOAD


def test_haproxy_send_proxy_v2(rig: Rig) -> None:
    reader, client = _through_haproxy(rig, "fe_v2", "v2")
    h = reader.header
    assert h is not None
    assert (h.version, h.command, h.family) == (2, Command.PROXY, Family.INET)
    assert h.source == (CLIENT_IP, client[1])
    assert h.destination == ("127.0.0.1", rig.ports["fe_v2"])
    assert reader.trailing == PAYLOAD


def test_haproxy_send_proxy_v2_ipv6(rig: Rig) -> None:
    reader, client = _through_haproxy(rig, "fe_v6", "v6")
    h = reader.header
    assert h is not None
    assert (h.version, h.family) == (2, Family.INET6)
    assert h.source == ("::1", client[1])
    assert h.destination == ("::1", rig.ports["fe_v6"])
    assert reader.trailing == PAYLOAD


def test_haproxy_v2_options_unique_id_authority_crc32c(rig: Rig) -> None:
    """Our header (with AUTHORITY) into accept-proxy; HAProxy's v2 with TLVs back out to us."""
    ours = build(
        2, ("127.0.0.9", 4242), ("127.0.0.10", 8443), tlvs=[TLV(TLVType.AUTHORITY, b"app.example")]
    )
    reader, _ = _through_haproxy(rig, "fe_v2x", "v2x", prefix=ours)
    h = reader.header
    assert h is not None
    assert h.source == ("127.0.0.9", 4242)
    assert h.destination == ("127.0.0.10", 8443)
    assert h.authority == "app.example"
    assert h.unique_id == b"L4LB-127.0.0.9-4242"
    assert h.crc32c is not None  # present, and verified by the parser (else it would raise)
    assert reader.trailing == PAYLOAD


def _accept_and_log(rig: Rig, header: bytes) -> bytes:
    client = socket.create_connection(("127.0.0.1", rig.ports["fe_accept"]), timeout=10)
    try:
        client.sendall(header + b"ping\r\n")
        client.shutdown(socket.SHUT_WR)
        for _ in range(10):  # skip late connections from the readiness probes
            conn, _ = rig.listeners["sink"].accept()
            with conn:
                got = _read_all(conn)
            if got:
                break
        client.settimeout(10)
        while client.recv(4096):
            pass
    finally:
        client.close()
    return got


CASES = [
    ("v1-tcp4", build(1, ("127.0.0.9", 4101), ("127.0.0.10", 80)), "127.0.0.9:4101 127.0.0.10:80"),
    ("v2-tcp4", build(2, ("127.0.0.9", 4102), ("127.0.0.10", 81)), "127.0.0.9:4102 127.0.0.10:81"),
    ("v1-tcp6", build(1, ("::1", 4103), ("::1", 82)), "::1:4103 ::1:82"),
    ("v2-tcp6", build(2, ("::1", 4104), ("::1", 83)), "::1:4104 ::1:83"),
    (
        "v2-tcp6-encode-tlvs-crc",
        encode(
            ProxyHeader(
                2,
                Command.PROXY,
                Family.INET6,
                Transport.STREAM,
                ("fd00::9", 4105),
                ("fd00::10", 84),
                (TLV(TLVType.ALPN, b"h2"), TLV(TLVType.NOOP, b"\0\0\0")),
            ),
            crc32c=True,
        ),
        "fd00::9:4105 fd00::10:84",
    ),
]


@pytest.mark.parametrize(("name", "header", "expected"), CASES, ids=[c[0] for c in CASES])
def test_our_headers_accepted_by_haproxy(rig: Rig, name: str, header: bytes, expected: str) -> None:
    assert _accept_and_log(rig, header) == b"ping\r\n"  # header consumed, payload intact
    assert wait_for(lambda: f"PPLOG {expected}" in rig.log(), timeout=10), rig.log()[-2000:]


def test_our_local_header_uses_the_real_address(rig: Rig) -> None:
    client = socket.socket()
    client.settimeout(10)
    client.bind(("127.0.0.11", 0))
    client.connect(("127.0.0.1", rig.ports["fe_accept"]))
    port = client.getsockname()[1]
    try:
        client.sendall(local_header() + b"ping\r\n")
        client.shutdown(socket.SHUT_WR)
        got = b""
        for _ in range(10):  # skip late connections from the readiness probes
            conn, _ = rig.listeners["sink"].accept()
            with conn:
                got = _read_all(conn)
            if got:
                break
        assert got == b"ping\r\n"
    finally:
        client.close()
    assert wait_for(lambda: f"PPLOG 127.0.0.11:{port} " in rig.log(), timeout=10)


def test_haproxy_rejects_our_header_with_corrupted_crc(rig: Rig) -> None:
    """The CRC we write is the one HAProxy checks: flip one bit and it drops the connection."""
    good = build(2, ("127.0.0.9", 4199), ("127.0.0.10", 85), crc32c=True)
    bad = good[:-1] + bytes([good[-1] ^ 1])
    client = socket.create_connection(("127.0.0.1", rig.ports["fe_accept"]), timeout=10)
    try:
        client.sendall(bad + b"ping\r\n")
        assert client.recv(100) == b""  # closed by HAProxy
    except ConnectionResetError:
        pass
    finally:
        client.close()
    rig.listeners["sink"].settimeout(0.5)
    try:
        with pytest.raises(TimeoutError):
            rig.listeners["sink"].accept()
    finally:
        rig.listeners["sink"].settimeout(10)
    assert wait_for(lambda: "invalid PROXY protocol header" in rig.log(), timeout=10)
    assert "PPLOG 127.0.0.9:4199" not in rig.log()


# ---- TLS: HAProxy's SSL TLV (send-proxy-v2-ssl-cn and proxy-v2-options) parsed by us


def _openssl(workdir: Path, name: str, cn: str) -> None:
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={cn}",
            "-keyout",
            str(workdir / f"{name}.key"),
            "-out",
            str(workdir / f"{name}.crt"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    pem = (workdir / f"{name}.crt").read_bytes() + (workdir / f"{name}.key").read_bytes()
    (workdir / f"{name}.pem").write_bytes(pem)


@pytest.mark.skipif(not have("openssl"), reason="the openssl command makes the test certificates")
def test_haproxy_ssl_tlv_from_a_tls_client(tmp_path: Path) -> None:
    _openssl(tmp_path, "server", "l4lb.test")
    _openssl(tmp_path, "client", "client.l4lb.test")
    capture = _listener()
    fe = free_port()
    body = f"""
frontend fe_tls
    bind 127.0.0.1:{fe} ssl crt {tmp_path}/server.pem alpn h2,http/1.1 verify optional ca-file {tmp_path}/client.crt
    default_backend be_tls
backend be_tls
    server s 127.0.0.1:{capture.getsockname()[1]} send-proxy-v2-ssl-cn proxy-v2-options ssl,cert-cn,ssl-cipher,cert-sig,cert-key,authority,crc32c
"""  # noqa: E501 - HAProxy config lines
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(tmp_path / "client.pem"))
    ctx.set_alpn_protocols(["h2"])
    try:
        with haproxy(tmp_path / "haproxy", body, wait=[("127.0.0.1", fe)]):
            _drain_pending(capture)
            raw = connect_from(CLIENT_IP, "127.0.0.1", fe)
            client_port = raw.getsockname()[1]
            with ctx.wrap_socket(raw, server_hostname="app.l4lb.test") as tls:
                tls.sendall(PAYLOAD)
                tls_version = tls.version()
                for _ in range(10):  # skip late connections from the readiness probe
                    conn, _ = capture.accept()
                    with conn:
                        conn.settimeout(10)
                        received = b""
                        while not received.endswith(PAYLOAD):
                            chunk = conn.recv(65536)
                            if not chunk:
                                break
                            received += chunk
                    if received.endswith(PAYLOAD):
                        break
    finally:
        capture.close()
    reader = HeaderReader()
    assert reader.feed(received) is not None, received
    h = reader.header
    assert h is not None
    assert h.source == (CLIENT_IP, client_port)
    assert h.authority == "app.l4lb.test"  # the SNI
    assert h.alpn == b"h2"
    assert h.crc32c is not None  # and verified
    info = h.ssl
    assert info is not None, h.tlvs
    assert info.ssl and info.cert_conn
    assert info.verify == 0 and info.verified
    assert info.version == tls_version
    assert info.cn == "client.l4lb.test"
    assert info.cipher  # e.g. TLS_AES_256_GCM_SHA384
    assert info.sig_alg == "RSA-SHA256"
    assert info.key_alg == "RSA2048"
    assert reader.trailing == PAYLOAD
