"""The relay's guarantees with ``source = "client"``: a real ``l4lb run`` connects to a backend
that reads no PROXY header, from the client's own address, on loopback (127.0.0.0/8 is local, so
the replies come back without a rule: ``transparent_routing = "off"``). Every relay mode.

These are go-mmproxy's first defect turned into tests: a client that sends its request and a FIN
gets the whole response (here 4 MiB, written only after the FIN arrived).
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import threading
from pathlib import Path

import pytest

from l4lb.proxy_protocol import ProxyHeader
from tests.balancer.conftest import RELAY_MODES
from tests.balancer.helpers import backend, connect, hash_until_eof, recv_all, reset
from tests.support.l4lb import config_text, l4lb
from tests.support.netns import needs_root
from tests.support.peers import free_port, wait_for

pytestmark = [needs_root, pytest.mark.parametrize("mode", RELAY_MODES)]

MB = 1 << 20
TRANSPARENT = {"source": "client", "send_proxy": "off"}


def cfg(port: int, backends: list[str], mode: str, **pool: object) -> str:
    return config_text(
        f"127.0.0.1:{port}",
        backends,
        top={"relay": mode, "transparent_routing": "off"},
        pool={**TRANSPARENT, **pool},
    )


def test_request_then_fin_gets_the_whole_response(tmp_path: Path, mode: str) -> None:
    answer = random.Random(7).randbytes(4 * MB)
    peers: list[tuple[str, int]] = []

    def handler(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
        peers.append(sock.getpeername()[:2])
        request = early + recv_all(sock)  # until the client's FIN
        sock.sendall(request + answer)  # the whole answer comes after the FIN

    port = free_port()
    with backend(handler, proxy=False) as be, l4lb(tmp_path, cfg(port, [be.address], mode)) as lb:
        client = connect(port, "127.0.0.9")
        client.sendall(b"GET / HTTP/1.0\r\n\r\n")
        client.shutdown(socket.SHUT_WR)
        got = recv_all(client)
        client.close()
        assert got == b"GET / HTTP/1.0\r\n\r\n" + answer
        assert peers[0][0] == "127.0.0.9"  # the backend saw the client, not the balancer
        (line,) = lb.wait_access(1)
        assert line["end"] == "client_closed"
        assert line["proxy"] == "off"


def test_backend_fin_first_then_client_keeps_sending(tmp_path: Path, mode: str) -> None:
    received: list[bytes] = []

    def handler(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
        sock.sendall(b"banner, then FIN")
        sock.shutdown(socket.SHUT_WR)
        received.append(early + recv_all(sock))

    port = free_port()
    with backend(handler, proxy=False) as be, l4lb(tmp_path, cfg(port, [be.address], mode)) as lb:
        client = connect(port, "127.0.0.10")
        assert recv_all(client) == b"banner, then FIN"
        client.sendall(b"still talking " * 1000)
        client.shutdown(socket.SHUT_WR)
        assert wait_for(lambda: bool(received))
        assert received[0] == b"still talking " * 1000
        client.close()
        (line,) = lb.wait_access(1)
        assert line["end"] == "backend_closed"


def test_bulk_both_ways_byte_exact(tmp_path: Path, mode: str) -> None:
    up, down = os.urandom(8 * MB), os.urandom(8 * MB)
    got: dict[str, tuple[str, int]] = {}

    def handler(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
        sender = threading.Thread(target=lambda: (sock.sendall(down), sock.shutdown(1)))
        sender.start()
        h = hashlib.sha256(early)
        n = len(early)
        while chunk := sock.recv(1 << 18):
            h.update(chunk)
            n += len(chunk)
        got["server"] = (h.hexdigest(), n)
        sender.join()

    port = free_port()
    with backend(handler, proxy=False) as be, l4lb(tmp_path, cfg(port, [be.address], mode)) as lb:
        client = connect(port, "127.0.0.11")
        sender = threading.Thread(target=lambda: (client.sendall(up), client.shutdown(1)))
        sender.start()
        assert hash_until_eof(client) == (hashlib.sha256(down).hexdigest(), len(down))
        sender.join()
        client.close()
        assert wait_for(lambda: "server" in got)
        assert got["server"] == (hashlib.sha256(up).hexdigest(), len(up))
        (line,) = lb.wait_access(1)
        assert (line["bytes_from_client"], line["bytes_to_client"]) == (len(up), len(down))


def test_backend_reset_resets_the_client(tmp_path: Path, mode: str) -> None:
    delivered = threading.Event()

    def handler(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
        sock.sendall(b"partial")
        delivered.wait(10)
        reset(sock)

    port = free_port()
    with backend(handler, proxy=False) as be, l4lb(tmp_path, cfg(port, [be.address], mode)) as lb:
        client = connect(port, "127.0.0.12")
        data = b""
        while len(data) < len(b"partial"):
            data += client.recv(100)
        delivered.set()
        with pytest.raises(ConnectionResetError):
            while client.recv(100):
                pass
        assert data == b"partial"
        (line,) = lb.wait_access(1)
        assert line["end"] == "reset"


def test_client_reset_resets_the_backend(tmp_path: Path, mode: str) -> None:
    outcome: list[str] = []
    arrived = threading.Event()

    def handler(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
        sock.settimeout(10)
        try:
            if early or sock.recv(100):
                arrived.set()
            while sock.recv(100):
                pass
            outcome.append("eof")
        except ConnectionResetError:
            outcome.append("reset")

    port = free_port()
    with backend(handler, proxy=False) as be, l4lb(tmp_path, cfg(port, [be.address], mode)) as lb:
        client = connect(port, "127.0.0.13")
        client.sendall(b"hello")
        assert arrived.wait(10)
        reset(client)
        assert wait_for(lambda: bool(outcome), 10)
        assert outcome == ["reset"]
        (line,) = lb.wait_access(1)
        assert line["end"] == "reset"


def test_backpressure_a_slow_reader_gets_every_byte(tmp_path: Path, mode: str) -> None:
    total = 32 * MB
    chunk = os.urandom(MB)
    sent_all = threading.Event()

    def handler(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
        for _ in range(total // MB):
            sock.sendall(chunk)
        sent_all.set()
        sock.shutdown(socket.SHUT_WR)
        recv_all(sock)

    port = free_port()
    with backend(handler, proxy=False) as be, l4lb(tmp_path, cfg(port, [be.address], mode)) as lb:
        client = connect(port, "127.0.0.14")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        client.sendall(b"go")
        # the client reads nothing: the backend is held back, its sendall cannot finish
        assert not sent_all.wait(1.0)
        assert lb.rss_kib() < 200 * 1024
        got = hashlib.sha256()
        n = 0
        while data := client.recv(1 << 16):
            got.update(data)
            n += len(data)
        assert n == total
        assert got.hexdigest() == hashlib.sha256(chunk * (total // MB)).hexdigest()
        client.close()
