"""A reset while the relay is paused by backpressure is acted on at once, in every relay mode.

The backend stops reading (small receive buffer), the client writes until everything between them
is full and the relay has stopped reading it; then the client resets. The relay must reset the
backend promptly (not at the next write or the idle timeout) and log ``reset``. A FIN in the same
state must close nothing early: the backend still gets every byte, then the FIN.
"""

from __future__ import annotations

import errno
import hashlib
import select
import socket
import threading
import time
from pathlib import Path

import pytest

from l4lb.proxy_protocol import ProxyHeader
from tests.balancer.conftest import RELAY_MODES
from tests.balancer.helpers import Backend, backend, connect, hash_until_eof, reset
from tests.support.l4lb import config_text, l4lb
from tests.support.peers import free_port, wait_for

pytestmark = pytest.mark.parametrize("mode", RELAY_MODES)

CHUNK = b"x" * (1 << 16)


def _stalled_backend(be: Backend) -> tuple[list[socket.socket], threading.Event]:
    """Make ``be`` keep each connection open without reading until ``release`` is set."""
    be.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    socks: list[socket.socket] = []
    release = threading.Event()

    def handler(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
        socks.append(sock)
        release.wait(30)

    be.handler = handler
    return socks, release


def _fill_until_paused(client: socket.socket) -> int:
    """Write until nothing more is taken for a while (the relay has paused); bytes written."""
    client.setblocking(False)
    sent = 0
    quiet_since = time.monotonic()
    deadline = quiet_since + 20
    while time.monotonic() < deadline:
        try:
            sent += client.send(CHUNK)
            quiet_since = time.monotonic()
        except BlockingIOError:
            if time.monotonic() - quiet_since > 1.0:
                return sent
            time.sleep(0.05)
    raise AssertionError(f"the relay never paused ({sent} bytes taken)")


def _events(sock: socket.socket, timeout_ms: int) -> int:
    """poll() without POLLIN: only a hang-up, an error or the peer's FIN shows (nothing is read)."""
    p = select.poll()
    p.register(sock, select.POLLRDHUP)
    found = p.poll(timeout_ms)
    return found[0][1] if found else 0


@pytest.mark.parametrize("resetter", ["client", "backend"])
def test_reset_while_paused_resets_the_other_side(tmp_path: Path, mode: str, resetter: str) -> None:
    port = free_port()
    with backend(lambda *_: None) as be:
        socks, release = _stalled_backend(be)
        cfg = config_text(f"127.0.0.1:{port}", [be.address], top={"relay": mode})
        try:
            with l4lb(tmp_path, cfg) as lb:
                client = socket.socket()
                if resetter == "backend":  # the client is the one that stops reading
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                client.settimeout(10)
                client.connect(("127.0.0.1", port))
                client.sendall(b"hi")
                assert wait_for(lambda: bool(socks), 5)
                (back,) = socks
                writer, other = (client, back) if resetter == "client" else (back, client)
                writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
                assert _fill_until_paused(writer) > 0
                assert _events(other, 0) == 0  # still open before the reset
                reset(writer)
                events = _events(other, 5000)  # promptly: well before any idle timeout
                assert events & (select.POLLERR | select.POLLHUP), events
                code = other.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                assert code == errno.ECONNRESET, code
                (line,) = lb.wait_access(1)
                assert line["end"] == "reset"
                client.close()
        finally:
            release.set()


def test_client_fin_while_paused_closes_nothing_early(tmp_path: Path, mode: str) -> None:
    port = free_port()
    with backend(lambda *_: None) as be:
        socks, release = _stalled_backend(be)
        cfg = config_text(f"127.0.0.1:{port}", [be.address], top={"relay": mode})
        try:
            with l4lb(tmp_path, cfg) as lb:
                client = connect(port)
                client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
                sent = _fill_until_paused(client)
                assert wait_for(lambda: bool(socks), 5)
                (back,) = socks
                assert _events(back, 0) == 0
                client.shutdown(socket.SHUT_WR)
                assert _events(back, 1000) == 0  # the FIN waits behind the stalled bytes
                back.settimeout(20)
                digest, n = hash_until_eof(back)  # now read: every byte, then the FIN
                assert n == sent
                assert digest == hashlib.sha256(b"x" * sent).hexdigest()
                back.sendall(b"bye")
                back.shutdown(socket.SHUT_WR)
                client.setblocking(True)
                client.settimeout(10)
                assert client.recv(10) == b"bye"
                assert client.recv(10) == b""
                (line,) = lb.wait_access(1)
                assert line["end"] == "client_closed"
                assert line["bytes_from_client"] == sent
                client.close()
        finally:
            release.set()
