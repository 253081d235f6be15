"""``check = "proxy-local"`` sends each backend the header it receives: v2 LOCAL, v1 UNKNOWN, or
nothing for a backend with ``send_proxy = "off"`` (it used to get a v2 header as data)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from l4lb.proxy_protocol import local_header
from tests.support.l4lb import config_text, l4lb
from tests.support.peers import free_port, wait_for


class Recorder:
    """A plain TCP server that records what each connection sent before closing."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while chunk := conn.recv(4096):
                        data += chunk
                except OSError:
                    pass
                self.received.append(data)


@contextmanager
def recorders(n: int) -> Iterator[list[Recorder]]:
    made = [Recorder() for _ in range(n)]
    try:
        yield made
    finally:
        for r in made:
            r.sock.close()


def test_proxy_local_follows_each_backends_send_proxy(tmp_path: Path) -> None:
    port = free_port()
    with recorders(3) as (v2, v1, off):
        backends = [
            {"address": f"127.0.0.1:{v2.port}"},
            {"address": f"127.0.0.1:{v1.port}", "send_proxy": "v1"},
            {"address": f"127.0.0.1:{off.port}", "send_proxy": "off"},
        ]
        text = config_text(
            f"127.0.0.1:{port}",
            backends,
            pool={"send_proxy": "v2"},
            health={"check": "proxy-local", "interval": "100ms"},
        )
        with l4lb(tmp_path, text) as lb:
            assert wait_for(lambda: all(len(r.received) >= 3 for r in (v2, v1, off)), 15)
            assert "Traceback" not in lb.log_text()
    assert set(v2.received) == {local_header(version=2)}
    assert set(v1.received) == {b"PROXY UNKNOWN\r\n"}
    assert set(off.received) == {b""}  # connected, sent nothing
