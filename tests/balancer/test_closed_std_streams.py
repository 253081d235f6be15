"""stdout and stderr closed at start, or a stdout pipe whose reader went away (EPIPE).

None of these may stop the balancer, put log bytes into a client's connection, or leave a
traceback; each is said once where it can be said.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.balancer.helpers import backend, hello
from tests.support.l4lb import config_text
from tests.support.peers import free_port, stop_process, wait_for


def _exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def _run(
    tmp_path: Path, workers: int, preexec: Callable[[], None] | None, stdout: int | None
) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    path = tmp_path / "l4lb.toml"
    path.write_text(
        config_text(
            f"127.0.0.1:{port}", [BACKEND[0]], top={"workers": workers}, access_log="stdout"
        )
    )
    err = tmp_path / "l4lb.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "l4lb", "run", "--config", str(path)],
        stdout=stdout,
        stderr=open(err, "wb"),  # noqa: SIM115
        preexec_fn=preexec,
    )
    return proc, port, err


BACKEND: list[str] = []


@pytest.fixture(autouse=True)
def _backend() -> object:
    with backend(hello) as be:
        BACKEND[:] = [be.address]
        yield be


def _serves(port: int) -> bool:
    payload = os.urandom(3000)
    try:
        got = _exchange(port, payload)
    except OSError:
        return False
    head, _, rest = got.partition(b"\n")
    return head.startswith(b"client=") and rest == payload  # nothing but the backend's bytes


@pytest.mark.parametrize("workers", [1, 2])
def test_stdout_closed_at_start(tmp_path: Path, workers: int) -> None:
    proc, port, err = _run(tmp_path, workers, lambda: os.close(1), None)
    try:
        assert wait_for(lambda: err.read_text().count("event=started") == workers, 20), (
            err.read_text()
        )
        assert all(_serves(port) for _ in range(20))
        assert os.readlink(f"/proc/{proc.pid}/fd/1") == "/dev/null"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        stop_process(proc)
    assert "Traceback" not in err.read_text()


def test_stderr_closed_at_start(tmp_path: Path) -> None:
    proc, port, _ = _run(tmp_path, 1, lambda: os.close(2), subprocess.DEVNULL)
    try:
        assert wait_for(lambda: _serves(port), 20)
        assert os.readlink(f"/proc/{proc.pid}/fd/2") == "/dev/null"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        stop_process(proc)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_stdout_pipe_whose_reader_left_is_said_once(tmp_path: Path, workers: int) -> None:
    r, w = os.pipe()
    proc, port, err = _run(tmp_path, workers, None, w)
    os.close(w)
    try:
        assert wait_for(lambda: err.read_text().count("event=started") == workers, 20)
        os.close(r)  # the reader goes away: every access-log write now fails with EPIPE
        r = -1
        assert all(_serves(port) for _ in range(50))
        assert wait_for(lambda: "event=access_log_write_failed" in err.read_text(), 20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if r >= 0:
            os.close(r)
        stop_process(proc)
    text = err.read_text()
    assert "Traceback" not in text
    assert text.count("event=access_log_write_failed") <= workers  # once per process
    assert "Broken pipe" in text
