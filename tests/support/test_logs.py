"""The growing-log readers: a half-written last line is left out, never parsed."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from tests.support.l4lb import L4lb
from tests.support.logs import complete_lines, complete_text, json_lines, wait_line


def test_a_partial_last_line_is_left_out(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    assert json_lines(path) == [] and complete_lines(path) == []
    path.write_text('{"n": 1}\n{"n": 2, "client": "127.0.')
    assert json_lines(path) == [{"n": 1}]
    assert complete_text(path) == '{"n": 1}\n'
    with path.open("a") as f:
        f.write('0.1:4000"}\n')
    assert json_lines(path) == [{"n": 1}, {"n": 2, "client": "127.0.0.1:4000"}]


def test_a_complete_line_that_is_not_json_is_still_an_error(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_text('{"n": 1}{"n": 2\n')  # two lines cut into each other: the writer's fault
    with pytest.raises(json.JSONDecodeError):
        json_lines(path)


def test_l4lb_access_lines_reads_while_the_writer_is_mid_line(tmp_path: Path) -> None:
    """The suite's reader raced a line written in two parts (issue 11, suite robustness)."""
    path = tmp_path / "access.log"
    lb = L4lb(proc=None, workdir=tmp_path, config_path=tmp_path / "l4lb.toml", binds=[])  # type: ignore[arg-type]
    done = threading.Event()

    def write() -> None:
        with path.open("a", buffering=1) as f:
            for i in range(2000):
                line = json.dumps({"n": i, "pad": "x" * 50}) + "\n"
                f.write(line[:30])
                f.flush()
                f.write(line[30:])
                f.flush()
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    reads = 0
    while not done.is_set():
        lines = lb.access_lines()  # raised JSONDecodeError on a half line before
        assert [line["n"] for line in lines] == list(range(len(lines)))
        reads += 1
    writer.join()
    assert [line["n"] for line in lb.access_lines()] == list(range(2000))
    assert reads > 0


def test_log_text_leaves_out_a_half_written_line_and_wait_log_waits_for_the_rest(
    tmp_path: Path,
) -> None:
    """A line about an event comes a moment after it (l4lb logs from a thread): reading the
    log at once saw ``event=reload`` of a line that was to say ``event=reloaded`` later."""
    path = tmp_path / "l4lb.log"
    lb = L4lb(proc=None, workdir=tmp_path, config_path=tmp_path / "l4lb.toml", binds=[])  # type: ignore[arg-type]
    path.write_text("event=started\nevent=reload")
    assert lb.log_text() == "event=started\n"
    with pytest.raises(AssertionError, match="'event=reloaded' not 1 time"):
        lb.wait_log("event=reloaded", timeout=0.2)

    def rest_of_the_line() -> None:
        with path.open("a") as f:
            f.write("ed listeners=1\n")

    finish = threading.Timer(0.2, rest_of_the_line)
    finish.start()
    try:
        text = lb.wait_log("event=reloaded", timeout=10)
    finally:
        finish.join()
    assert text.endswith("event=reloaded listeners=1\n")
    assert wait_line(path, "event=", count=2, timeout=0) == text
