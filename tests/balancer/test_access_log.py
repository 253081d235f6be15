"""The access-log writer: lines in order, JSON, flushed by close, never blocking the caller."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from l4lb.observe.access_log import AccessLog
from tests.balancer.helpers import backend, connect, echo, recv_all
from tests.support.l4lb import config_text, l4lb
from tests.support.logs import json_lines
from tests.support.peers import free_port, wait_for


def test_file_lines_in_order_and_appended(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_text('{"event":"old"}\n')
    log = AccessLog(str(path))
    for i in range(1000):
        log.write({"event": "connection", "n": i, "client": "127.0.0.1:1"})
    log.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"event": "old"}
    assert [line["n"] for line in lines[1:]] == list(range(1000))
    assert all(line["time"].endswith("Z") for line in lines[1:])


def test_write_is_cheap_and_off_costs_nothing(tmp_path: Path) -> None:
    off = AccessLog("off")
    off.write({"event": "connection"})
    off.close()
    log = AccessLog(str(tmp_path / "a.log"))
    start = time.perf_counter()
    for i in range(20000):
        log.write({"n": i})
    elapsed = time.perf_counter() - start
    log.close()
    assert len((tmp_path / "a.log").read_text().splitlines()) == 20000
    assert elapsed < 5  # liveness only: the caller only queues
    log.close()  # idempotent


# -- logrotate's way: rename the access log, SIGHUP, and the next lines go to a fresh file.


def _one_connection(port: int) -> None:
    with connect(port) as s:
        s.sendall(b"ping")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"ping"


def _lines(path: Path) -> list[dict[str, object]]:
    """The complete lines so far (the writer thread may be in the middle of one)."""
    return json_lines(path)


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
