"""The relay end to end: a real ``l4lb run`` between real sockets, for every relay mode."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import select
import socket
import threading
import time
from pathlib import Path

import pytest

from l4lb.proxy_protocol import ProxyHeader, TLVType
from tests.balancer.conftest import RELAY_MODES
from tests.balancer.helpers import (
    backend,
    connect,
    dead_port,
    echo,
    hash_until_eof,
    hello,
    recv_all,
    reset,
)
from tests.support.l4lb import config_text, l4lb
from tests.support.peers import free_port, wait_for

MODES = [*RELAY_MODES, "kernel-at-once"]
"""Every relay, and the kernel relay with every connection handed to the kernel right after the
PROXY header, so that bulk and slow readers go through the kernel's data path itself (with the
default hand-over they stay on splice)."""

pytestmark = pytest.mark.parametrize("mode", MODES)

MB = 1 << 20


def blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def relay_keys(mode: str) -> dict[str, object]:
    """The top-level config keys that choose ``mode``."""
    if mode == "kernel-at-once":
        return {"relay": "kernel", "kernel": {"handover_exchanges": 0}}
    return {"relay": mode}


def cfg(port: int, backends: list[str], mode: str, **pool: object) -> str:
    return config_text(f"127.0.0.1:{port}", backends, top=relay_keys(mode), pool=pool)


def test_bulk_both_ways_byte_exact(tmp_path: Path, mode: str) -> None:
    up, down = blob(24 * MB, 1), blob(24 * MB, 2)
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
    with backend(handler) as be, l4lb(tmp_path, cfg(port, [be.address], mode)) as lb:
        client = connect(port, "127.0.0.3")
        sender = threading.Thread(target=lambda: (client.sendall(up), client.shutdown(1)))
        sender.start()
        digest, n = hash_until_eof(client)
        sender.join()
        client.close()
        assert (digest, n) == (hashlib.sha256(down).hexdigest(), len(down))
        assert wait_for(lambda: "server" in got)
        assert got["server"] == (hashlib.sha256(up).hexdigest(), len(up))
        (line,) = lb.wait_access(1)
        assert line["bytes_from_client"] == len(up)
        assert line["bytes_to_client"] == len(down)
        assert line["client"].startswith("127.0.0.3:")
        assert line["end"] in ("client_closed", "backend_closed")


def test_half_close_client_first(tmp_path: Path, mode: str) -> None:
    def handler(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
        request = early + recv_all(sock)  # until the client's FIN, which the relay passed on
        sock.sendall(b"answer to " + request)  # so the answer comes after it

    port = free_port()
    with backend(handler) as be, l4lb(tmp_path, cfg(port, [be.address], mode)) as lb:
        client = connect(port)
        client.sendall(b"question")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b"answer to question"
        client.close()
        (line,) = lb.wait_access(1)
        assert line["end"] == "client_closed"


def test_half_close_backend_first(tmp_path: Path, mode: str) -> None:
    received: list[bytes] = []

    def handler(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
        sock.sendall(b"banner, then FIN")
        sock.shutdown(socket.SHUT_WR)
        received.append(early + recv_all(sock))

    port = free_port()
    with backend(handler) as be, l4lb(tmp_path, cfg(port, [be.address], mode)) as lb:
        client = connect(port)
        assert recv_all(client) == b"banner, then FIN"  # the relay passed the FIN on
        client.sendall(b"still talking " * 1000)
        client.shutdown(socket.SHUT_WR)
        assert wait_for(lambda: bool(received))
        assert received[0] == b"still talking " * 1000
        client.close()
        (line,) = lb.wait_access(1)
        assert line["end"] == "backend_closed"


def test_backend_reset_closes_client_promptly(tmp_path: Path, mode: str) -> None:
    delivered = threading.Event()

    def handler(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
        sock.sendall(b"partial")
        delivered.wait(10)  # the client has it: the reset comes after the bytes
        reset(sock)

    port = free_port()
    with backend(handler) as be, l4lb(tmp_path, cfg(port, [be.address], mode)) as lb:
        client = connect(port)
        client.settimeout(5)
        start = time.monotonic()
        data = b""
        while len(data) < len(b"partial"):
            data += client.recv(100)
        delivered.set()
        with pytest.raises(ConnectionResetError):
            while True:
                chunk = client.recv(100)
                if not chunk:
                    break
                data += chunk
        assert data == b"partial"
        assert time.monotonic() - start < 4
        (line,) = lb.wait_access(1)
        assert line["end"] == "reset"


def test_client_reset_closes_backend_promptly(tmp_path: Path, mode: str) -> None:
    outcome: list[str] = []
    arrived = threading.Event()

    def handler(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
        sock.settimeout(5)
        try:
            if early or sock.recv(100):
                arrived.set()
            while sock.recv(100):
                pass
            outcome.append("eof")
        except ConnectionResetError:
            outcome.append("reset")
        except TimeoutError:
            outcome.append("timeout")

    port = free_port()
    with backend(handler) as be, l4lb(tmp_path, cfg(port, [be.address], mode)) as lb:
        client = connect(port)
        client.sendall(b"hello")
        assert arrived.wait(10)  # relayed: the reset comes to an established relay
        reset(client)
        assert wait_for(lambda: bool(outcome), 6)
        assert outcome == ["reset"]
        (line,) = lb.wait_access(1)
        assert line["end"] == "reset"


def test_slow_reader_keeps_memory_bounded(tmp_path: Path, mode: str) -> None:
    total = 96 * MB
    chunk = os.urandom(MB)

    def handler(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
        for _ in range(total // MB):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        recv_all(sock)

    port = free_port()
    with backend(handler) as be, l4lb(tmp_path, cfg(port, [be.address], mode)) as lb:
        client = connect(port)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        client.sendall(b"go")
        time.sleep(0.5)
        before = lb.rss_kib()
        time.sleep(2.0)  # the backend keeps pushing; the client reads nothing
        during = lb.rss_kib()
        assert during - before < 16 * 1024, (before, during)
        got = 0
        while True:  # read slowly at first, then all of it
            data = client.recv(1 << 16)
            if not data:
                break
            got += len(data)
            if got < 2 * MB:
                time.sleep(0.001)
        assert got == total
        assert lb.rss_kib() - before < 24 * 1024
        client.close()


def test_dead_backends_are_retried(tmp_path: Path, mode: str) -> None:
    dead = [f"127.0.0.1:{dead_port()}", f"127.0.0.1:{dead_port()}"]
    port = free_port()
    with backend(hello) as be:
        text = cfg(port, [*dead, be.address], mode, retries=2, connect_timeout="1s")
        with l4lb(tmp_path, text) as lb:
            for i in range(6):
                client = connect(port, f"127.0.0.{10 + i}")
                client.sendall(b"ping")
                client.shutdown(socket.SHUT_WR)
                assert (
                    recv_all(client)
                    == f"client=('127.0.0.{10 + i}', {client.getsockname()[1]})\nping".encode()
                )
                client.close()
            lines = lb.wait_access(6)
            assert all(line["backend"] == be.address for line in lines)
            lb.wait_log("event=connect_failed")


def test_all_backends_dead_closes_client_with_reason(tmp_path: Path, mode: str) -> None:
    dead = [f"127.0.0.1:{dead_port()}", f"127.0.0.1:{dead_port()}"]
    port = free_port()
    with l4lb(tmp_path, cfg(port, dead, mode, retries=5)) as lb:
        # the RST can beat connect()'s or sendall()'s return on a busy machine
        with pytest.raises(ConnectionResetError):
            client = connect(port)
            client.settimeout(5)
            client.sendall(b"anyone?")
            client.recv(10)
        (line,) = lb.wait_access(1)
        assert line["end"] == "connect_failed"
        assert "Connection refused" in line["detail"]
        lb.wait_log("event=connect_failed")


def test_early_client_bytes_survive_failed_connects(tmp_path: Path, mode: str) -> None:
    # A black-holed connect would need a non-loopback address; a slow accept queue is enough:
    # the client's bytes wait while a dead backend is tried first.
    dead = f"127.0.0.1:{dead_port()}"
    port = free_port()
    with backend(echo) as be, l4lb(tmp_path, cfg(port, [dead, be.address], mode)) as lb:
        payload = blob(256 * 1024, 5)
        for _ in range(2):
            client = connect(port)
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == payload
            client.close()
        assert len(lb.wait_access(2)) == 2


def test_idle_timeout(tmp_path: Path, mode: str) -> None:
    port = free_port()
    with (
        backend(echo) as be,
        l4lb(tmp_path, cfg(port, [be.address], mode, idle_timeout="600ms")) as lb,
    ):
        client = connect(port)
        client.sendall(b"x")
        assert client.recv(1) == b"x"
        start = time.monotonic()
        assert client.recv(1) == b""  # closed by the balancer
        assert 0.4 < time.monotonic() - start < 5
        (line,) = lb.wait_access(1)
        assert line["end"] == "idle_timeout"


def test_listener_max_conns_stops_accepting(tmp_path: Path, mode: str) -> None:
    port = free_port()
    with backend(echo) as be:
        text = config_text(
            f"127.0.0.1:{port}", [be.address], top=relay_keys(mode), listener={"max_conns": 2}
        )
        with l4lb(tmp_path, text):
            held = [connect(port) for _ in range(2)]
            for c in held:
                c.sendall(b"a")
                assert c.recv(1) == b"a"
            waiting = connect(port)  # completes in the kernel backlog, not accepted
            waiting.sendall(b"b")
            time.sleep(0.5)
            assert len(be.seen) == 2
            held[0].close()
            assert waiting.recv(1) == b"b"  # accepted once a slot was free
            assert len(be.seen) == 3
            for c in [*held[1:], waiting]:
                c.close()


def test_graceful_stop_finishes_transfers(tmp_path: Path, mode: str) -> None:
    size = 16 * MB
    data = blob(size, 9)

    def handler(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
        view = memoryview(data)
        for i in range(0, size, 256 * 1024):  # paced: about 2 s per transfer
            sock.sendall(view[i : i + 256 * 1024])
            time.sleep(0.03)
        sock.shutdown(socket.SHUT_WR)
        recv_all(sock)

    port = free_port()
    results: list[tuple[str, int]] = []
    with backend(handler) as be:
        lb_ctx = l4lb(tmp_path, cfg(port, [be.address], mode))
        with lb_ctx as lb:
            clients = [connect(port) for _ in range(3)]
            threads = [
                threading.Thread(target=lambda c=c: results.append(hash_until_eof(c)))
                for c in clients
            ]
            for t in threads:
                t.start()
            assert wait_for(lambda: len(be.seen) == 3)  # every transfer has started
            stopper = threading.Thread(target=lambda: results.append(("exit", lb.stop(20))))
            stopper.start()
            # the listener is closed before "draining" is logged (a fixed 0.3 s sleep raced the
            # SIGTERM on a loaded machine: the probe was accepted and got the backend's bytes)
            assert wait_for(lambda: "event=draining" in lb.log_text(), 20), lb.log_text()
            with pytest.raises(OSError):
                connect(port).recv(1)  # no longer accepting
            for t in threads:
                t.join(30)
            stopper.join(30)
            code = next(r for r in results if r[0] == "exit")[1]
            assert code == 0
            transfers = [r for r in results if r[0] != "exit"]
            assert transfers == [(hashlib.sha256(data).hexdigest(), size)] * 3


def test_drain_timeout_closes_leftovers(tmp_path: Path, mode: str) -> None:
    port = free_port()
    with backend(echo) as be:
        text = config_text(
            f"127.0.0.1:{port}", [be.address], top={**relay_keys(mode), "drain_timeout": "500ms"}
        )
        with l4lb(tmp_path, text) as lb:
            client = connect(port)
            client.sendall(b"x")
            assert client.recv(1) == b"x"
            start = time.monotonic()
            assert lb.stop(10) == 0
            assert time.monotonic() - start < 8
            # closed by the balancer: a FIN, or a RST if bytes were still unread
            with contextlib.suppress(ConnectionResetError):
                assert recv_all(client) == b""
            (line,) = lb.access_lines()
            assert line["end"] == "shutdown"


def test_access_log_line(tmp_path: Path, mode: str) -> None:
    port = free_port()
    with backend(echo) as be:
        text = cfg(port, [be.address], mode, proxy_tlvs=["unique_id"])
        with l4lb(tmp_path, text) as lb:
            client = connect(port, "127.0.0.42")
            client.sendall(b"12345")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"12345"
            cport = client.getsockname()[1]
            client.close()
            (line,) = lb.wait_access(1)
            header = be.seen[0].header
            assert header is not None
            uid = header.tlv(TLVType.UNIQUE_ID)
            assert uid is not None
            assert line["unique_id"] == uid.decode()
            assert line["client"] == f"127.0.0.42:{cport}"
            assert line["backend"] == be.address
            assert line["proxy"] == "v2"
            assert line["listener"] == "main"
            assert line["upstream"] is None
            assert (line["bytes_from_client"], line["bytes_to_client"]) == (5, 5)
            assert line["end"] == "client_closed"
            assert line["duration"] >= 0 and line["time"].endswith("Z")


def test_backend_resetting_at_once_never_leaks_the_client(tmp_path: Path, mode: str) -> None:
    def handler(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
        reset(sock)

    port = free_port()
    with (
        backend(handler, proxy=False) as be,
        l4lb(tmp_path, cfg(port, [be.address], mode)) as lb,
    ):
        for _ in range(5):
            try:
                client = connect(port)
            except ConnectionResetError:
                # the backend's RST, passed on by the balancer, can beat connect()'s return
                # when the test thread waits for the CPU: the client was closed, not leaked
                continue
            client.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                assert recv_all(client) == b""
            client.close()
        lines = lb.wait_access(5)
        assert len(lines) == 5
        # the RST can beat the connect check: then it counts as a failed connect
        assert {line["end"] for line in lines} <= {"reset", "backend_closed", "connect_failed"}


def test_connect_timeout_then_next_backend_keeps_early_bytes(tmp_path: Path, mode: str) -> None:
    # A listener whose accept queue is full drops SYNs: connects to it hang until the timeout.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(hole.getsockname())
        fillers.append(f)
    assert select.select([], fillers[:1], [], 5)[1]  # the first is queued: the queue is full
    black = f"127.0.0.1:{hole.getsockname()[1]}"
    port = free_port()
    try:
        with backend(echo) as be:
            text = cfg(port, [black, be.address], mode, connect_timeout="300ms", retries=1)
            with l4lb(tmp_path, text) as lb:
                payload = blob(64 * 1024, 3)
                client = connect(port)
                client.sendall(payload)  # sent while the balancer waits on the black hole
                client.shutdown(socket.SHUT_WR)
                start = time.monotonic()
                assert recv_all(client) == payload
                assert time.monotonic() - start >= 0.25
                (line,) = lb.wait_access(1)
                assert line["backend"] == be.address
                lb.wait_log("connect timeout after 0.3s")
    finally:
        for f in fillers:
            f.close()
        hole.close()
