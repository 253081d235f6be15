"""The examples run as their docstrings show, and see the client named by the PROXY header."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from l4lb.proxy_protocol import build
from tests.backend.servers import closed_by_peer, http_get, http_request, recv_line
from tests.support.peers import connect_from, free_port, stop_process, wait_port

ROOT = Path(__file__).resolve().parents[2]


def _start(tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    log = open(tmp_path / "example.log", "wb")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_asgi_ratelimit_example(tmp_path: Path) -> None:
    port = free_port()
    proc = _start(
        tmp_path,
        "examples/asgi_ratelimit.py",
        "--bind",
        f"127.0.0.1:{port}",
        "--trusted",
        "127.0.0.1/32",
        "--no-access-log",
    )
    try:
        wait_port("127.0.0.1", port, proc=proc)
        statuses: dict[str, list[int]] = {"192.0.2.1": [], "192.0.2.2": []}
        for ip in ("192.0.2.1", "192.0.2.2"):
            with connect_from("127.0.0.1", "127.0.0.1", port) as s:
                s.sendall(build(2, (ip, 1000), ("127.0.0.1", port)))
                for _ in range(12):  # burst of 10, then 429 for this client only
                    statuses[ip].append(http_request(s)[0])
        for ip, codes in statuses.items():
            assert codes[:10] == [200] * 10, ip
            assert 429 in codes[10:], ip
    finally:
        stop_process(proc)
    log = (tmp_path / "example.log").read_text()
    assert "192.0.2.1:1000 via 127.0.0.1:" in log and '"GET /" 429' in log


def test_asyncio_service_example(tmp_path: Path) -> None:
    port = free_port()
    proc = _start(tmp_path, "examples/asyncio_service.py", "--bind", f"127.0.0.1:{port}")
    try:
        wait_port("127.0.0.1", port, proc=proc)
        with connect_from("127.0.0.1", "127.0.0.1", port) as s:
            s.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 9000\r\nhello\n")
            assert recv_line(s) == b"220 hello 192.0.2.7:5555\r\n"
            assert recv_line(s) == b"echo hello\n"
        with connect_from("127.0.0.9", "127.0.0.1", port) as s:
            s.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 9000\r\nhello\n")
            assert closed_by_peer(s)
        # The docstring's bash recipe, as written.
        recipe = (
            f"exec 3<>/dev/tcp/127.0.0.1/{port}\n"
            "printf 'PROXY TCP4 192.0.2.7 127.0.0.1 5555 9000\\r\\nhello\\n' >&3; head -2 <&3"
        )
        out = subprocess.run(["bash", "-c", recipe], capture_output=True, text=True, timeout=20)
        assert out.stdout.splitlines() == ["220 hello 192.0.2.7:5555", "echo hello"]
    finally:
        stop_process(proc)
    log = (tmp_path / "example.log").read_text()
    assert "client 192.0.2.7:5555 via 127.0.0.1:" in log
    assert "rejected 127.0.0.9:" in log and "Traceback" not in log


def test_http_server_example(tmp_path: Path) -> None:
    port = free_port()
    proc = _start(tmp_path, "examples/http_server.py", "--bind", f"127.0.0.1:{port}")
    try:
        wait_port("127.0.0.1", port, proc=proc)
        with connect_from("127.0.0.1", "127.0.0.1", port) as s:
            s.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 8080\r\n")
            info = http_get(s)
            assert info["client"] == ["192.0.2.7", 5555] and info["version"] == 1
        # The docstring's curl, which sends a v1 header naming its own address.
        out = subprocess.run(
            ["curl", "-s", "--max-time", "10", "--haproxy-protocol", f"http://127.0.0.1:{port}/"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert '"version": 1' in out.stdout and '"client": ["127.0.0.1"' in out.stdout
    finally:
        stop_process(proc)
    log = (tmp_path / "example.log").read_text()
    assert "192.0.2.7 - - [" in log and '"GET / HTTP/1.1" 200' in log


def _docstring_commands(module: str) -> list[str]:
    """The server command lines in an example's docstring, continuation lines joined."""
    text = (ROOT / "examples" / f"{module}.py").read_text()
    doc = text.split('"""')[1].replace("\\\\\n", "\\\n")
    commands, current = [], ""
    for line in doc.splitlines():
        if not line.startswith("    "):
            continue
        current += line.strip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if not current.startswith("curl"):
            commands.append(current)
        current = ""
    return commands


@pytest.mark.parametrize(
    ("module", "count"),
    [("django_app", 1), ("flask_app", 1), ("aiohttp_app", 2), ("uvicorn_workers", 1)],
)
def test_production_examples_run_as_their_docstrings_show(
    module: str, count: int, tmp_path: Path
) -> None:
    commands = _docstring_commands(module)
    assert len(commands) == count, commands
    for index, command in enumerate(commands):
        port = free_port()
        local = re.sub(r"127\.0\.0\.1:80[0-9]0\b", f"127.0.0.1:{port}", command)
        env = dict(os.environ, PYTHONPATH=str(ROOT), GUNICORN_CMD_ARGS="--no-control-socket")
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
        log = open(tmp_path / f"{index}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            ["bash", "-c", local],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_port("127.0.0.1", port, timeout=30, proc=proc)
            # The docstring's curl: a v1 header naming curl's own address.
            out = subprocess.run(
                [
                    "curl",
                    "-s",
                    "--max-time",
                    "10",
                    "--haproxy-protocol",
                    f"http://127.0.0.1:{port}/",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            )
            assert json.loads(out.stdout)["client"][0] == "127.0.0.1", out
            with connect_from("127.0.0.1", "127.0.0.1", port) as s:  # no header: refused
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert closed_by_peer(s), command
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
            log.close()
