"""sd_notify after a reload: ``RELOADING=1`` then ``READY=1`` with ``STATUS=`` saying whether
the reload was applied or refused (``systemctl status`` shows it), over a real NOTIFY_SOCKET."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from tests.support.echo_backend import EchoBackend
from tests.support.l4lb import config_text, start_l4lb
from tests.support.peers import free_port, stop_process


def test_status_carries_the_last_reload_outcome(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify.sock"
    port = free_port()
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
        EchoBackend("echo") as backend,
    ):
        notify.bind(str(path))
        notify.settimeout(20)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))  # inherited by the balancer
        config = config_text(f"127.0.0.1:{port}", [backend.address])
        lb = start_l4lb(tmp_path / "lb", config)
        try:
            assert "READY=1" in notify.recv(4096).decode().split("\n")
            lb.proc.send_signal(signal.SIGHUP)
            got = [notify.recv(4096).decode(), notify.recv(4096).decode()]
            assert got[0].startswith("RELOADING=1"), got
            assert "READY=1" in got[1] and "STATUS=reload applied (1)" in got[1], got
            lb.write_config(config.replace('pool = "main"', 'pool = "nowhere"'))
            lb.proc.send_signal(signal.SIGHUP)
            got = [notify.recv(4096).decode(), notify.recv(4096).decode()]
            assert got[0].startswith("RELOADING=1"), got
            lines = got[1].split("\n")
            assert "READY=1" in lines, got
            status = next(line for line in lines if line.startswith("STATUS="))
            assert status.startswith("STATUS=reload refused: "), status
            assert "nowhere" in status and status.endswith("serving the previous config")
        finally:
            stop_process(lb.proc)


def test_a_notify_socket_nobody_reads_never_blocks_the_balancer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sd_notify never blocks: with the receiver's queue full (net.unix.max_dgram_qlen, 10 by
    default) the message is dropped with a warning, and the balancer keeps serving."""
    from tests.support.echo_backend import echo_through

    path = tmp_path / "notify.sock"
    port = free_port()
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
        EchoBackend("echo") as backend,
    ):
        notify.bind(str(path))  # and never read
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        lb = start_l4lb(tmp_path / "lb", config_text(f"127.0.0.1:{port}", [backend.address]))
        try:
            for _ in range(12):  # 2 messages each: far over the queue
                lb.reload()
            assert echo_through("127.0.0.1", port, b"still here\n") == ("echo", b"still here\n")
            assert lb.log_text().count("event=reloaded") == 12, lb.log_text()
            assert "event=sd_notify_failed" in lb.log_text()
        finally:
            stop_process(lb.proc)
