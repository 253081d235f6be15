"""Log rotation: contrib/logrotate.d/l4lb run by the real ``logrotate`` against a running
l4lb; SIGUSR2 reopens the access log and nothing else; a refused reload still reopens it."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support.echo_backend import EchoBackend
from tests.support.l4lb import config_text, start_l4lb
from tests.support.logs import json_lines
from tests.support.peers import free_port, stop_process, wait_for

SNIPPET = Path(__file__).parents[2] / "contrib" / "logrotate.d" / "l4lb"
LOGROTATE = shutil.which("logrotate") or "/usr/sbin/logrotate"


def _one_connection(port: int, payload: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):
            pass


def _clients(path: Path) -> int:
    return len([line for line in json_lines(path) if line["event"] == "connection"])


def test_logrotate_snippet_rotates_and_l4lb_follows(tmp_path: Path) -> None:
    if not Path(LOGROTATE).exists():
        pytest.fail("logrotate is not installed: make sysdeps installs it")
    logs = tmp_path / "log"
    logs.mkdir()
    access = logs / "access.log"
    port = free_port()
    with EchoBackend("echo") as backend:
        lb = start_l4lb(
            tmp_path / "lb",
            config_text(f"127.0.0.1:{port}", [backend.address], access_log=str(access)),
        )
        try:
            _one_connection(port, b"before\n")
            assert wait_for(lambda: _clients(access) == 1, 10)
            # the shipped snippet, with this test's folder and process in place of the unit's
            text = SNIPPET.read_text().replace("/var/log/l4lb", str(logs))
            text = text.replace(
                "systemctl kill --kill-whom=main --signal=USR2 l4lb.service",
                f"kill -USR2 {lb.pid}",
            )
            assert f"kill -USR2 {lb.pid}" in text
            conf = tmp_path / "logrotate.conf"
            conf.write_text(text)
            done = subprocess.run(
                [LOGROTATE, "--force", "--state", str(tmp_path / "state"), str(conf)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            rotated = logs / "access.log.1"  # delaycompress: the newest rotation stays plain
            assert rotated.exists(), sorted(p.name for p in logs.iterdir())
            assert wait_for(lambda: "event=reopen_logs" in lb.log_text(), 10)
            assert wait_for(lambda: access.exists(), 10), lb.log_text()
            _one_connection(port, b"after\n")
            assert wait_for(lambda: _clients(access) == 1, 10), lb.log_text()
            assert _clients(rotated) == 1
            assert lb.proc.poll() is None  # reopened, not stopped
            assert "event=reloaded" not in lb.log_text()  # nothing else happened
        finally:
            stop_process(lb.proc)


def test_a_refused_reload_still_reopens_the_access_log(tmp_path: Path) -> None:
    port = free_port()
    with EchoBackend("echo") as backend:
        config = config_text(f"127.0.0.1:{port}", [backend.address])
        lb = start_l4lb(tmp_path / "lb", config)
        access = tmp_path / "lb" / "access.log"
        try:
            _one_connection(port, b"before\n")
            assert wait_for(lambda: _clients(access) == 1, 10)
            access.rename(access.with_suffix(".log.1"))
            with socket.socket() as taken:  # the new file's second listener cannot bind
                taken.bind(("127.0.0.1", 0))
                taken.listen()
                busy = f"127.0.0.1:{taken.getsockname()[1]}"
                lb.write_config(
                    config + f'\n[[listeners]]\nname = "second"\nbind = "{busy}"\npool = "main"\n'
                )
                lb.proc.send_signal(signal.SIGHUP)
                assert wait_for(lambda: "event=reload_rejected" in lb.log_text(), 10)
            assert wait_for(lambda: access.exists(), 10), lb.log_text()
            _one_connection(port, b"after\n")
            assert wait_for(lambda: _clients(access) == 1, 10), lb.log_text()
            assert _clients(access.with_suffix(".log.1")) == 1
        finally:
            stop_process(lb.proc)
