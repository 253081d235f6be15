"""Out of file descriptors: said at start when the limit is short, never blamed on a backend.

At EMFILE the health checker used to count its own failed ``socket()`` against every backend:
health_down, then an empty pool and every client reset, though the backends were fine.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from l4lb.balancer.command import FDS_SPARE, fd_budget
from l4lb.balancer.health import local_resource_error
from l4lb.config.loader import load_config
from tests.balancer.helpers import backend, hello
from tests.support.l4lb import config_text
from tests.support.peers import free_port, stop_process, wait_for


def _run(workdir: Path, text: str, nofile: int) -> subprocess.Popen[bytes]:
    (workdir / "l4lb.toml").write_text(text)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return subprocess.Popen(
        [sys.executable, "-m", "l4lb", "run", "--config", "l4lb.toml"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "l4lb.log", "wb"),
        preexec_fn=limit,
    )


@pytest.mark.parametrize("max_conns_set", [False, True], ids=["default", "set"])
def test_a_limit_just_short_of_the_need_is_said_once_with_what_fits(
    tmp_path: Path, max_conns_set: bool
) -> None:
    """The default config (splice, max_conns = 10000) under a 20,000 hard limit: the pipes it
    would like (4 a connection) are never needed to serve, so only the sockets count: 64 of the
    process's own + 2 x 10000 = 20064, 9968 connections fit. Said once; a warning only when the
    file sets max_conns (the default is the balancer's choice, told at info level)."""
    port = free_port()
    listener = {"max_conns": 10000} if max_conns_set else {}
    text = config_text(f"127.0.0.1:{port}", ["127.0.0.1:9"], listener=listener)
    proc = _run(tmp_path, text, 20_000)
    log = lambda: (tmp_path / "l4lb.log").read_text()  # noqa: E731
    try:
        assert wait_for(lambda: "event=started" in log(), 20), log()
    finally:
        stop_process(proc)
    level = "warning" if max_conns_set else "info"
    line = "event=fd_limit limit=20000 needed=20064 connections_fit=9968 max_conns=10000"
    assert f"level={level} logger=l4lb.run " + line in log(), log()
    assert log().count("event=fd_limit") == 1, log()
    assert "LimitNOFILE" in log()
    if not max_conns_set:
        assert "level=warning" not in log(), log()


def test_the_estimate_counts_splice_pipes_health_checks_and_the_admin_api(tmp_path: Path) -> None:
    text = config_text(
        "127.0.0.1:1",
        ["127.0.0.1:9", "127.0.0.1:10"],
        listener={"max_conns": 100},
        top={"relay": "stream"},
    )
    path = tmp_path / "a.toml"
    path.write_text(text)
    budget = fd_budget(load_config(path))
    assert budget.needed == budget.wanted == FDS_SPARE + 2 * 100
    path.write_text(
        'relay = "splice"\n'
        + config_text(
            "127.0.0.1:1",
            ["127.0.0.1:9", "127.0.0.1:10"],
            listener={"max_conns": 100},
            health={"check": "tcp"},
        )
        + '\n[admin]\nbind = "127.0.0.1:2"\n'
    )
    budget = fd_budget(load_config(path))
    assert budget.needed == FDS_SPARE + 67 + 2 + 2 * 100  # admin, two checks, two sockets each
    assert budget.wanted == budget.needed + 4 * 100  # and a pipe each way, while busy
    assert budget.connections_fit(budget.needed - 1) == 99
    assert budget.pipes_fit(budget.needed + 21) == 10


def test_local_resource_errors_are_told_apart() -> None:
    import errno

    assert all(local_resource_error(e) for e in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS))
    assert not any(
        local_resource_error(e) for e in (errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EHOSTUNREACH)
    )


def test_out_of_descriptors_takes_no_backend_down(tmp_path: Path) -> None:
    port = free_port()
    with backend(hello) as be:
        text = config_text(
            f"127.0.0.1:{port}",
            [be.address],
            health={"check": "tcp", "interval": "100ms", "fall": 2, "rise": 1},
        )
        proc = _run(tmp_path, text, 128)
        log = lambda: (tmp_path / "l4lb.log").read_text()  # noqa: E731
        held: list[socket.socket] = []
        try:
            assert wait_for(lambda: "event=started" in log(), 20), log()
            for _ in range(100):  # 200 descriptors in the balancer: far past its 128
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                held.append(s)
            assert wait_for(lambda: "Too many open files" in log(), 20), log()
            # the health checker runs out too: said, and not counted against the backend
            assert wait_for(lambda: "event=health_check_local_error" in log(), 20), log()
            assert "event=health_down" not in log()
            for s in held:
                s.close()
            held = []

            def served() -> bool:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    try:
                        return s.recv(100).startswith(b"client=")
                    except OSError:
                        return False

            assert wait_for(served, 20), log()
            assert "event=health_down" not in log()
            assert "pool_empty" not in log() and "no_backend" not in log()
            assert proc.poll() is None
        finally:
            for s in held:
                s.close()
            stop_process(proc)
    assert "Traceback" not in log()
    assert os.path.exists(tmp_path / "l4lb.log")
