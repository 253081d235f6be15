"""The access-log writer: lines in order, JSON, flushed by close, never blocking the caller."""

from __future__ import annotations

import json
import time
from pathlib import Path

from l4lb.observe.access_log import AccessLog


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
