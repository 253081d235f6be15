"""The paced generator (bench/harness/paced.py) against a small real server: every answered
request's times, kept with ``--raw`` for a tail's analysis, are in order, and the summary's
percentiles follow from them."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.bench.harness_module import load

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"


paced = load("paced")


@contextmanager
def _server() -> Iterator[int]:
    """Answers every request on a new connection, then closes it."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.05)  # a close from another thread does not wake accept(): look again
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                got = b""
                while b"\r\n\r\n" not in got:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    got += chunk
                conn.sendall(ANSWER)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        srv.close()


def test_raw_times_are_kept_for_every_answered_request_in_order(tmp_path: Path) -> None:
    raw = tmp_path / "raw.jsonl"
    with _server() as port:
        res = paced.run(port, rate=200, duration=0.2, timeout=5, raw=str(raw))
    rows = [json.loads(line) for line in raw.read_text().splitlines()]
    assert res["errors"] == 0 and res["ok"] == res["requests"] == len(rows) == 40
    for scheduled, connected, first, end in rows:
        assert 0 <= scheduled <= connected <= first <= end
    totals = sorted((end - scheduled) / 1000 for scheduled, _, _, end in rows)
    # the raw file keeps 0.1 µs: the summary's p99 (1 µs) is that request's, to its rounding
    assert abs(res["p99_ms"] - totals[int(0.99 * len(totals))]) < 0.002
    assert res["p50_ms"] <= res["p99_ms"] <= res["p999_ms"] <= res["max_ms"]
