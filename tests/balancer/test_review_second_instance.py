"""A second ``l4lb run`` on a config already running exits 3 instead of sharing the ports.

The listening sockets use SO_REUSEPORT (workers, reloads), so without a check the second process
bound too and silently took about half of the new connections.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.balancer.helpers import backend, connect, hello, recv_all
from tests.support.l4lb import config_text, l4lb
from tests.support.peers import free_port, stop_process


@pytest.mark.parametrize("workers", [1, 2])
def test_second_instance_exits_3_and_the_first_keeps_every_connection(
    tmp_path: Path, workers: int
) -> None:
    port = free_port()
    with backend(hello) as be:
        text = config_text(f"127.0.0.1:{port}", [be.address])
        with l4lb(tmp_path / "first", text) as lb:
            second = tmp_path / "second.toml"
            second.write_text(text.replace("workers = 1", f"workers = {workers}"))
            err = tmp_path / "second.log"
            proc = subprocess.Popen(
                [sys.executable, "-m", "l4lb", "run", "--config", str(second)],
                stdout=subprocess.DEVNULL,
                stderr=open(err, "wb"),  # noqa: SIM115
            )
            try:
                code = proc.wait(30)
            finally:
                stop_process(proc)  # SIGTERM: a supervisor also stops its workers
            stderr = err.read_text()
            assert code == 3, stderr
            assert f"listeners[0].bind: cannot bind 127.0.0.1:{port}" in stderr
            assert "already in use" in stderr
            assert "Traceback" not in stderr
            for _ in range(20):
                with connect(port) as s:
                    s.shutdown(socket.SHUT_WR)
                    assert recv_all(s).startswith(b"client=")
            assert len(lb.wait_access(20)) == 20  # all 20 went through the first instance
