"""``l4lb demo`` and ``l4lb demo-backend``, run as a user would, and tried with curl."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from l4lb.proxy_protocol import build
from tests.support.peers import free_port, stop_process, wait_for, wait_port


def _start(args: list[str], out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "l4lb", *args],
        stdout=open(out, "wb"),
        stderr=subprocess.STDOUT,
    )


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port, b1, b2 = free_port(), free_port(), free_port()
    out = tmp_path / "demo.out"
    proc = _start(
        ["demo", "--port", str(port), "--backend-port", str(b1), "--backend-port", str(b2)], out
    )
    try:
        assert wait_for(lambda: "Try it" in out.read_text(), 20), out.read_text()
        yield port, out
    finally:
        stop_process(proc)
    assert proc.returncode == 0, out.read_text()


def curl(*args: str) -> str:
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_demo_answers_curl_with_the_real_client(demo: tuple[int, Path]) -> None:
    port, out = demo
    assert f"curl http://127.0.0.1:{port}/" in out.read_text()
    first = curl(f"http://127.0.0.1:{port}/")
    second = curl("--interface", "127.0.0.7", f"http://127.0.0.1:{port}/")
    assert "PROXY header      v2 PROXY" in first
    assert "your address      127.0.0.1:" in first
    assert "your address      127.0.0.7:" in second
    assert f"you connected to  127.0.0.1:{port}" in second
    assert "unique_id" in first
    # round robin: the two answers come from the two backends
    assert {"backend-1" in first, "backend-1" in second} == {True, False}
    assert wait_for(lambda: out.read_text().count('"event":"connection"') >= 2)


def test_demo_plain_text_for_non_http(demo: tuple[int, Path]) -> None:
    port, _ = demo
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"hello\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    text = data.decode()
    assert not text.startswith("HTTP/")
    assert "Hello from backend-" in text and "your address      127.0.0.1:" in text


@pytest.mark.parametrize("version", [1, 2])
def test_demo_backend_standalone(tmp_path: Path, version: int) -> None:
    port = free_port()
    out = tmp_path / "backend.out"
    proc = _start(["demo-backend", "--listen", f"127.0.0.1:{port}", "--proxy", f"v{version}"], out)
    try:
        wait_port("127.0.0.1", port, proc=proc)
        header = build(version, ("192.0.2.10", 4321), ("127.0.0.1", port))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(header + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"your address      192.0.2.10:4321" in data
        other = build(3 - version, ("192.0.2.10", 4321), ("127.0.0.1", port))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(other)
            answer = s.recv(4096)
        assert f"expected a PROXY v{version} header".encode() in answer
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\n\r\n")
            answer = s.recv(4096)
        assert b"requires a PROXY" in answer
    finally:
        stop_process(proc)
