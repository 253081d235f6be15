"""l4lb.backend.uvicorn: real uvicorn servers, keep-alive, WebSocket upgrades, TLVs, serve-asgi."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from websockets.sync.client import connect as ws_connect

from l4lb.backend.serve import parse_bind
from l4lb.proxy_protocol import TLV, SSLInfo, TLVType, build, local_header
from tests.backend.servers import (
    CLIENT,
    DEST,
    TLSInOneSegment,
    closed_by_peer,
    http_get,
    make_cert,
    policy,
    server_context,
    tls_client,
    uvicorn_server,
    ws_first_message,
)
from tests.support.peers import connect_from, free_port, stop_process, wait_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("version", "http"), [(1, "auto"), (2, "auto"), (2, "h11")])
def test_every_request_on_a_keep_alive_connection(version: int, http: str) -> None:
    with (
        uvicorn_server(policy(), http=http) as port,
        connect_from("127.0.0.1", "127.0.0.1", port) as s,
    ):
        s.sendall(build(version, CLIENT, DEST))
        for _ in range(3):
            info = http_get(s)
            assert info["client"] == list(CLIENT)
            assert info["server"] == list(DEST)
            assert info["version"] == version
            assert info["reason"] == "header"
            assert info["upstream"] == ["127.0.0.1", s.getsockname()[1]]


def test_header_and_request_in_one_segment_and_split() -> None:
    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    header = build(2, CLIENT, DEST)
    with uvicorn_server(policy()) as port:
        with connect_from("127.0.0.1", "127.0.0.1", port) as s:
            s.sendall(header + request[:5])  # leftover bytes after the header reach uvicorn
            s.sendall(request[5:])
            s.settimeout(5)
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
        with connect_from("127.0.0.1", "127.0.0.1", port) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(len(header)):
                s.sendall(header[i : i + 1])
                time.sleep(0.002)
            assert http_get(s)["client"] == list(CLIENT)


def test_tlvs_reach_the_scope_extension() -> None:
    ssl = SSLInfo(client=1, verify=0, tlvs=(TLV(TLVType.SSL_VERSION, b"TLSv1.3"),)).to_tlv()
    tlvs = [TLV(TLVType.AUTHORITY, b"shop.example"), TLV(TLVType.UNIQUE_ID, b"req-42"), ssl]
    with uvicorn_server(policy()) as port, connect_from("127.0.0.1", "127.0.0.1", port) as s:
        s.sendall(build(2, CLIENT, DEST, tlvs=tlvs))
        info = http_get(s)
        assert info["authority"] == "shop.example"
        assert info["unique_id"] == "req-42"
        assert info["tlv_types"] == [TLVType.AUTHORITY, TLVType.UNIQUE_ID, TLVType.SSL]
        assert info["ssl"]["ssl"] is True and info["ssl"]["version"] == "TLSv1.3"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # uvicorn's legacy websockets impl
@pytest.mark.filterwarnings("ignore:The `websockets` implementation is deprecated")
@pytest.mark.parametrize("ws", ["websockets-sansio", "websockets"])
def test_websocket_upgrade_keeps_the_real_address(ws: str) -> None:
    with uvicorn_server(policy(), ws=ws) as port:
        s = connect_from("127.0.0.1", "127.0.0.1", port)
        s.sendall(build(2, CLIENT, DEST, tlvs=[TLV(TLVType.UNIQUE_ID, b"ws-1")]))
        with ws_connect(f"ws://127.0.0.1:{port}/ws", sock=s, open_timeout=10) as ws:
            info = json.loads(ws.recv(timeout=10))
            assert info["client"] == list(CLIENT)
            assert info["server"] == list(DEST)
            assert info["unique_id"] == "ws-1"
            assert info["version"] == 2
            ws.send("hi")
            assert ws.recv(timeout=10) == "echo hi"


def test_local_header_uses_the_socket_addresses() -> None:
    with uvicorn_server(policy()) as port, connect_from("127.0.0.1", "127.0.0.1", port) as s:
        s.sendall(local_header(2))
        info = http_get(s)
        assert info["client"] == ["127.0.0.1", s.getsockname()[1]]
        assert info["server"] == ["127.0.0.1", port]
        assert info["reason"] == "local"


def test_untrusted_forged_and_silent_peers_are_closed() -> None:
    with uvicorn_server(policy(timeout=0.5)) as port:
        with connect_from("127.0.0.9", "127.0.0.1", port) as s:
            s.sendall(build(1, ("198.51.100.42", 1), DEST) + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert closed_by_peer(s)
        with connect_from("127.0.0.1", "127.0.0.1", port) as s:
            assert closed_by_peer(s, timeout=5)
        with connect_from("127.0.0.1", "127.0.0.1", port) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # no header from the balancer
            assert closed_by_peer(s)


def test_optional_mode_direct_client() -> None:
    with uvicorn_server(policy("optional")) as port:
        with connect_from("127.0.0.9", "127.0.0.1", port) as s:
            info = http_get(s)
            assert info["client"] == ["127.0.0.9", s.getsockname()[1]]
            assert info["reason"] == "direct" and info["version"] is None
        with connect_from("127.0.0.9", "127.0.0.1", port) as s:
            s.sendall(build(1, CLIENT, DEST))
            assert closed_by_peer(s)


def test_tls_terminated_after_the_header(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    with uvicorn_server(policy(), ssl=server_context(cert, key)) as port:
        s = connect_from("127.0.0.1", "127.0.0.1", port)
        s.sendall(build(2, CLIENT, DEST, tlvs=[TLV(TLVType.UNIQUE_ID, b"tls-1")]))
        with tls_client(s, cert) as t:
            for _ in range(2):
                info = http_get(t)
                assert info["client"] == list(CLIENT) and info["server"] == list(DEST)
                assert info["scheme"] == "https" and info["unique_id"] == "tls-1"
        # A WebSocket over that TLS (wss) keeps the real address too.
        s = connect_from("127.0.0.1", "127.0.0.1", port)
        s.sendall(build(1, CLIENT, DEST))
        with tls_client(s, cert) as t:
            info = ws_first_message(t)
            assert info["client"] == list(CLIENT) and info["scheme"] == "wss"


def test_tls_client_hello_in_the_same_segment_as_the_header(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    with (
        uvicorn_server(policy(), ssl=server_context(cert, key)) as port,
        connect_from("127.0.0.1", "127.0.0.1", port) as s,
    ):
        client = TLSInOneSegment(s, cert, build(1, CLIENT, DEST))
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        response = client.recv_until(b"}")
        assert response.startswith(b"HTTP/1.1 200")
        body = json.loads(response.partition(b"\r\n\r\n")[2])
        assert body["client"] == list(CLIENT) and body["scheme"] == "https"


# --- l4lb serve-asgi -------------------------------------------------------------------------


def _l4lb() -> list[str]:
    return [sys.executable, "-m", "l4lb"]


def test_serve_asgi_command(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            *_l4lb(),
            "serve-asgi",
            "tests.backend.servers:asgi_app",
            "--bind",
            f"127.0.0.1:{port}",
            "--accept-proxy",
            "required",
            "--trusted",
            "127.0.0.1/32",
            "--header-timeout",
            "2",
            "--ssl-certfile",
            cert,
            "--ssl-keyfile",
            key,
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        wait_port("127.0.0.1", port, proc=proc)
        s = connect_from("127.0.0.1", "127.0.0.1", port)
        s.sendall(build(1, CLIENT, DEST))
        with tls_client(s, cert) as t:
            info = http_get(t)
            assert info["client"] == list(CLIENT)
            assert info["server"] == list(DEST)
            assert info["scheme"] == "https"
        with connect_from("127.0.0.9", "127.0.0.1", port) as s:
            s.sendall(build(1, CLIENT, DEST))
            assert closed_by_peer(s)
    finally:
        stop_process(proc)
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "rejected 127.0.0.9:" in text and "untrusted" in text
    assert "Traceback" not in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trusted", "127.0.0.1", "--http", "nosuch"], "--http 'nosuch'"),
        (["--trusted", "10.0.0.1/8"], "write 10.0.0.0/8"),
        (["--trusted", "nope"], "'nope' is not a CIDR block"),
        ([], "would refuse every connection"),
        (["--bind", "localhost"], "expected HOST:PORT"),
        (["--trusted", "127.0.0.1", "--header-timeout", "0"], "header_timeout must be a positive"),
        (["--trusted", "127.0.0.1", "--ssl-certfile", "/nonexistent.pem"], "no such file"),
        (["--trusted", "127.0.0.1", "--ssl-keyfile", "k.pem"], "--ssl-keyfile needs"),
        (
            ["--trusted", "127.0.0.1", "--accept-proxy", "optional", "--ssl-certfile", __file__],
            "not a usable certificate",
        ),
    ],
)
def test_serve_asgi_bad_arguments(args: list[str], message: str) -> None:
    result = subprocess.run(
        [*_l4lb(), "serve-asgi", "tests.backend.servers:asgi_app", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("[::1]:8000", ("::1", 8000)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
    ],
)
def test_parse_bind(text: str, expected: tuple[str, int]) -> None:
    assert parse_bind(text) == expected


@pytest.mark.parametrize("text", ["8000", ":80", "::1:80", "host:http", "h:70000"])
def test_parse_bind_errors(text: str) -> None:
    with pytest.raises(ValueError, match="--bind"):
        parse_bind(text)


@pytest.mark.parametrize(
    ("app", "message"),
    [
        ("nosuch.module:app", "cannot load 'nosuch.module:app': ModuleNotFoundError"),
        ("tests.backend.servers:nothing", "cannot load 'tests.backend.servers:nothing'"),
        ("no_colon", "cannot load 'no_colon'"),
    ],
)
def test_serve_asgi_app_that_cannot_load(app: str, message: str) -> None:
    result = subprocess.run(
        [*_l4lb(), "serve-asgi", app, "--trusted", "127.0.0.1", "--bind", "127.0.0.1:0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
