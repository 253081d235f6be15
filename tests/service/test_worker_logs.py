"""With several workers every log line says which worker wrote it: ``worker=N`` on stderr
after the logger, ``"worker": N`` in the access log; the supervisor's own lines carry none."""

from __future__ import annotations

import re
import socket
from pathlib import Path

from tests.support.echo_backend import EchoBackend
from tests.support.l4lb import config_text, start_l4lb
from tests.support.peers import free_port, stop_process, wait_for


def test_each_line_names_its_worker(tmp_path: Path) -> None:
    port = free_port()
    with EchoBackend("echo") as backend:
        text = config_text(f"127.0.0.1:{port}", [backend.address], top={"workers": 2})
        lb = start_l4lb(tmp_path / "lb", text)
        try:
            assert wait_for(lambda: lb.log_text().count("event=started") == 2, 20)
            for n in range(20):  # the kernel spreads the clients over both workers
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    sock.sendall(b"hello %d\n" % n)
                    sock.shutdown(socket.SHUT_WR)
                    while sock.recv(4096):
                        pass
            assert wait_for(lambda: len(lb.access_lines()) == 20, 20)
            workers = {line["worker"] for line in lb.access_lines()}
            assert workers <= {0, 1} and workers, lb.access_lines()
        finally:
            stop_process(lb.proc)
    started = [line for line in lb.log_text().splitlines() if "event=started" in line]
    assert sorted(re.findall(r" worker=(\d) ", " ".join(started))) == ["0", "1"], started
    supervisor = [line for line in lb.log_text().splitlines() if "event=workers_start" in line]
    assert supervisor and " worker=" not in supervisor[0], supervisor


def test_the_supervisor_says_once_how_many_workers_start_and_stop(tmp_path: Path) -> None:
    port = free_port()
    with EchoBackend("echo") as backend:
        text = config_text(f"127.0.0.1:{port}", [backend.address], top={"workers": 2})
        lb = start_l4lb(tmp_path / "lb", text)
        try:
            assert wait_for(lambda: "event=workers_started" in lb.log_text(), 20), lb.log_text()
        finally:
            lb.stop()
    lines = lb.log_text().splitlines()
    started = [line for line in lines if "event=workers_started" in line]
    assert len(started) == 1 and "workers=2 " in started[0], started
    assert " worker=" not in started[0]
    per_worker = [line for line in lines if "event=started" in line]
    assert len(per_worker) == 2 and all("workers=1" not in line for line in per_worker), lines
    stopped = [line for line in lines if "event=workers_stopped" in line]
    assert len(stopped) == 1 and "workers=2 status=0" in stopped[0], lines
