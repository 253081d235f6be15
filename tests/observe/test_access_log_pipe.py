"""The access log into a pipe: whole lines per write (workers share it), bounded when not read."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from l4lb.observe.access_log import PIPE_BUF, AccessLog, chunks, dropped
from tests.balancer.helpers import backend, hello
from tests.support.l4lb import config_text
from tests.support.peers import free_port, stop_process, wait_for


def test_a_line_longer_than_pipe_buf_is_cut_and_stays_json(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    log = AccessLog(str(path))
    log.write({"event": "connection", "listener": "x" * 5000, "detail": "é" * 3000, "n": 1})
    log.write({"event": "connection", "n": 2})
    log.close()
    raw = path.read_bytes().splitlines(keepends=True)
    assert all(len(line) <= PIPE_BUF for line in raw)
    first, second = (json.loads(line) for line in raw)
    assert first["truncated"] is True and first["n"] == 1
    assert first["listener"] == "x" * 256
    assert second == {"event": "connection", "n": 2, "time": second["time"]}


def test_chunks_are_whole_lines_within_pipe_buf() -> None:
    lines = [(b"%d" % i) * (i % 700 + 1) + b"\n" for i in range(2000)]
    lines = [line for line in lines if len(line) <= PIPE_BUF]
    out = chunks(lines)
    assert b"".join(out) == b"".join(lines)
    assert all(len(c) <= PIPE_BUF and c.endswith(b"\n") for c in out)


def test_a_pipe_nobody_reads_bounds_the_queue_and_counts_the_drops(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("l4lb.access")
    logger.addHandler(handler)
    before = dropped()
    log = AccessLog(str(fifo), max_queued=1000)
    try:
        for i in range(20_000):  # the writer blocks on the full pipe after ~300 lines
            log.write({"event": "rejected", "n": i, "detail": "x" * 150})
            assert log._queue.qsize() <= 1000
        lost = dropped() - before
        assert 20_000 - 1000 - 2000 < lost < 20_000
        # a reader comes: what was queued gets written, and every loss is reported
        got = bytearray()

        def drain() -> None:
            while True:
                try:
                    chunk = os.read(reader, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    return
                got.extend(chunk)

        t = threading.Thread(target=drain, daemon=True)
        t.start()
        log.close()
        t.join(10)
        lines = [json.loads(line) for line in bytes(got).splitlines()]
        assert len(lines) == 20_000 - lost
        assert [x["n"] for x in lines] == sorted(x["n"] for x in lines)
        reports = [m for m in seen if m.startswith("event=access_log_dropped")]
        counts = [int(m.split("count=")[1].split()[0]) for m in reports]
        assert sum(counts) == lost, seen
        assert f"total={dropped()}" in reports[-1]
    finally:
        logger.removeHandler(handler)
        os.close(reader)


def test_two_workers_into_one_stdout_pipe_never_cut_a_line(tmp_path: Path) -> None:
    port = free_port()
    with backend(hello) as be:
        text = config_text(
            f"127.0.0.1:{port}",
            [be.address],
            top={"workers": 2},
            access_log="stdout",
        )
        path = tmp_path / "l4lb.toml"
        path.write_text(text)
        proc = subprocess.Popen(
            [sys.executable, "-m", "l4lb", "run", "--config", str(path)],
            stdout=subprocess.PIPE,
            stderr=open(tmp_path / "l4lb.log", "wb"),  # noqa: SIM115
        )
        out = bytearray()
        assert proc.stdout is not None
        pipe = proc.stdout

        def slow_reader() -> None:  # like a busy journald: the pipe is often full
            fd = pipe.fileno()
            while chunk := os.read(fd, 1024):
                out.extend(chunk)
                time.sleep(0.002)

        reader = threading.Thread(target=slow_reader, daemon=True)
        reader.start()
        try:
            log_text = lambda: (tmp_path / "l4lb.log").read_text()  # noqa: E731
            assert wait_for(lambda: log_text().count("event=started") == 2, 20)
            count = 0

            def clients(first: int) -> None:
                nonlocal count
                for i in range(1500):
                    with socket.socket() as s:
                        s.bind((f"127.0.{first + i % 2}.{i % 250 + 1}", 0))
                        s.connect(("127.0.0.1", port))
                        s.recv(100)
                    count += 1

            threads = [threading.Thread(target=clients, args=(n,)) for n in (1, 3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            proc.terminate()
            assert proc.wait(30) == 0
            reader.join(10)
        finally:
            stop_process(proc)
        lines = bytes(out).splitlines()
        bad = []
        for line in lines:
            try:
                json.loads(line)
            except ValueError:
                bad.append(line)
        assert bad == [], f"{len(bad)} of {len(lines)} lines are not JSON, e.g. {bad[:2]!r}"
        assert len(lines) == count == 3000
