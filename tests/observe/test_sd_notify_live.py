"""A real ``l4lb run`` tells systemd it is ready, over a real AF_UNIX datagram NOTIFY_SOCKET."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

from tests.observe.live import Ports, l4lb_run
from tests.support.echo_backend import EchoBackend, echo_through


def test_ready_and_stopping(tmp_path: Path) -> None:
    a = EchoBackend("a").start()
    ports = Ports()
    front, admin = ports["front"], ports["admin"]
    config = f"""
workers = 1
drain_timeout = "2s"

[[listeners]]
name = "front"
bind = "127.0.0.1:{front}"
pool = "web"

[pools.web]
backends = [{{ address = "{a.address}" }}]

[log]
access = "off"

[admin]
bind = "127.0.0.1:{admin}"
"""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(path))
        notify.settimeout(20)
        try:
            env = {"NOTIFY_SOCKET": str(path)}
            with l4lb_run(tmp_path, config, env) as lb:
                messages = notify.recv(4096).decode().split("\n")
                assert "READY=1" in messages
                # READY came once the listener was bound: traffic flows
                assert echo_through("127.0.0.1", front, b"ping")[1] == b"ping"
                lb.proc.send_signal(signal.SIGHUP)
                got = [notify.recv(4096).decode(), notify.recv(4096).decode()]
                assert got[0].startswith("RELOADING=1") and "READY=1" in got[1]
                lb.proc.send_signal(signal.SIGTERM)
                assert "STOPPING=1" in notify.recv(4096).decode().split("\n")
                assert lb.proc.wait(20) == 0
        finally:
            a.stop()
