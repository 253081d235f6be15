"""``l4lb demo-backend`` ends every answer with a FIN, never a reset, even with unread input."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from l4lb.proxy_protocol import build
from tests.support.peers import free_port, stop_process, wait_port


def _start(tmp_path: Path) -> tuple[int, Path, subprocess.Popen[bytes]]:
    """A real ``l4lb demo-backend`` on a free port, its output in ``backend.log``."""
    port = free_port()
    log = tmp_path / "backend.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "l4lb", "demo-backend", "--listen", f"127.0.0.1:{port}"],
        stdout=open(log, "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port("127.0.0.1", port, timeout=20)
    except BaseException:
        stop_process(proc)
        raise
    return port, log, proc


def test_answer_survives_input_the_backend_did_not_read(tmp_path: Path) -> None:
    """A request larger than the backend's one read used to be closed with unread input: the
    kernel then sends a RST instead of a FIN, and the client saw ECONNRESET (under load, a
    request arriving after the backend's short wait lost its whole answer the same way)."""
    port, log, proc = _start(tmp_path)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            header = build(2, ("127.0.0.7", 40000), ("127.0.0.1", 8080))
            body = b"x" * 300_000
            request = b"POST / HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(body)
            sock.sendall(header + request + body)
            answer = b""
            while chunk := sock.recv(65536):  # ConnectionResetError here was the bug
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:200]
        assert b"127.0.0.7:40000" in answer
    finally:
        stop_process(proc)
    assert "Traceback" not in log.read_text()


def test_sigterm_with_connections_open_exits_cleanly(tmp_path: Path) -> None:
    """SIGTERM while one client is silent (no header yet) and another still holds its socket
    after the answer: exit 0, and no traceback (cancelled connection tasks printed one)."""
    port, log, proc = _start(tmp_path)
    try:
        silent = socket.create_connection(("127.0.0.1", port), timeout=10)
        answered = socket.create_connection(("127.0.0.1", port), timeout=10)
        answered.sendall(build(2, ("127.0.0.7", 40000), ("127.0.0.1", 8080)) + b"hi\n")
        while answered.recv(65536):  # the answer, then the backend's FIN; our side stays open
            pass
        proc.terminate()
        assert proc.wait(10) == 0
        silent.close()
        answered.close()
    finally:
        stop_process(proc)
    assert "Traceback" not in log.read_text(), log.read_text()
