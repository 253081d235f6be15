"""logrotate's way: rename the access log, SIGHUP, and the next lines go to a fresh file."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from tests.balancer.helpers import backend, connect, echo, recv_all
from tests.support.l4lb import config_text, l4lb
from tests.support.peers import free_port, wait_for


def _one_connection(port: int) -> None:
    with connect(port) as s:
        s.sendall(b"ping")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"ping"


def _lines(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_access_log_reopened_after_rename_and_sighup(tmp_path: Path) -> None:
    port = free_port()
    with backend(echo) as be, l4lb(tmp_path, config_text(f"127.0.0.1:{port}", [be.address])) as lb:
        log = tmp_path / "access.log"
        _one_connection(port)
        assert wait_for(lambda: len(_lines(log)) == 1, 10)
        rotated = tmp_path / "access.log.1"
        log.rename(rotated)
        lb.reload()  # SIGHUP, as logrotate's postrotate does
        _one_connection(port)
        assert wait_for(lambda: len(_lines(log)) == 1, 10), lb.log_text()
        assert len(_lines(rotated)) == 1  # the old file kept its line and got no other
        assert _lines(log)[0]["client"] != _lines(rotated)[0]["client"]
        assert "Traceback" not in lb.log_text()
