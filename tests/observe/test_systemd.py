"""sd_notify over a real AF_UNIX datagram socket, as systemd provides it."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from l4lb.observe import systemd


def test_notify_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        assert systemd.notify("READY=1", {"NOTIFY_SOCKET": str(path)})
        assert sock.recv(4096) == b"READY=1"


def test_notify_abstract_socket(tmp_path: Path) -> None:
    name = f"l4lb-test-{os.getpid()}-{tmp_path.name}"  # unique across concurrent test runs
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert systemd.notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STOPPING=1"


def test_without_socket_nothing_happens(tmp_path: Path) -> None:
    assert not systemd.notify("READY=1", {})
    # A socket that does not exist is logged, not raised.
    assert not systemd.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "missing")})
