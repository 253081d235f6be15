"""One balancer through a bad afternoon: hostile clients, broken backends, a crowd, then SIGTERM.

Every scenario runs against the real ``l4lb run`` while a long-lived connection keeps echoing;
each leaves a specific access-log line, none leaves a traceback, and the stop is prompt.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from l4lb.proxy_protocol import ProxyHeader
from tests.balancer.conftest import RELAY_MODES
from tests.balancer.helpers import backend, connect, dead_port, echo, recv_all
from tests.support.l4lb import config_text, start_l4lb
from tests.support.peers import free_port, stop_process, wait_port

CROWD = 1000

BAD_HEADERS = [
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 +2\r\n", "bad_header:bad_port"),
    (b"PROXY " + b"A" * 200, "bad_header:too_long"),
    (b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + bytes(12), "bad_header:bad_version"),
    (b"PROXY TCP4 999.2.3.4 5.6.7.8 1 2\r\n", "bad_header:bad_address"),
]


def _silent(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
    """Accept and read, answer nothing, until the balancer closes."""
    sock.settimeout(30)
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


def _resetter(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _attempt(port: int, payload: bytes) -> bytes | str:
    """Connect, send, read to the end; the error's name if the balancer reset us."""
    try:
        with connect(port) as s:
            s.sendall(payload)
            return recv_all(s)
    except OSError as err:
        return type(err).__name__


def _listener(
    name: str,
    port: int,
    backends: list[str],
    listener: str = "",
    pool: str = "",
    timeouts: str = "1s",
) -> str:
    """A listener and its own pool (same name); ``listener``/``pool`` are extra TOML lines."""
    entries = ", ".join(f'{{ address = "{b}" }}' for b in backends)
    return (
        f'\n[[listeners]]\nname = "{name}"\nbind = "127.0.0.1:{port}"\npool = "{name}"\n'
        f"{listener}\n[pools.{name}]\n"
        f'idle_timeout = "{timeouts}"\nconnect_timeout = "{timeouts}"\n{pool}'
        f"backends = [{entries}]\n"
    )


@contextlib.contextmanager
def _stopped(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield proc
    finally:
        stop_process(proc)


def _crowd(port: int) -> int:
    """CROWD clients open at once, each sends a line and reads its answer to the end."""
    socks: list[socket.socket] = []
    try:  # closed even when the crowd fails: leaked sockets would fail the next tests
        for _ in range(CROWD):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(b"hello\n")
            s.setblocking(False)
            socks.append(s)
        sel = selectors.DefaultSelector()
        got = {s: b"" for s in socks}
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        open_ = CROWD
        deadline = time.monotonic() + 60
        while open_ and time.monotonic() < deadline:
            for key, _ in sel.select(1):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if data:
                    got[s] += data
                else:
                    sel.unregister(s)
                    open_ -= 1
    finally:
        for s in socks:
            s.close()
    return sum(1 for v in got.values() if b"Hello from" in v)


@pytest.mark.parametrize("mode", RELAY_MODES)
def test_hostile_clients_broken_backends_and_a_crowd(tmp_path: Path, mode: str) -> None:
    crowd_port = free_port()
    ports = {name: free_port() for name in ("main", "trusted", "silent", "reset", "dead", "crowd")}
    crowd_backend = subprocess.Popen(
        [sys.executable, "-m", "l4lb", "demo-backend", "--listen", f"127.0.0.1:{crowd_port}"],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "crowd-backend.log", "wb"),  # noqa: SIM115
    )
    with (  # the crowd's backend is stopped however the test ends (it was left running when
        _stopped(crowd_backend),  # the balancer failed to start)
        backend(echo) as eb,
        backend(_silent) as sb,
        backend(_resetter) as rb,
    ):
        wait_port("127.0.0.1", crowd_port, timeout=20)
        text = config_text(
            f"127.0.0.1:{ports['main']}",
            [eb.address],
            top={"relay": mode, "drain_timeout": "2s"},
            # the keeper idles through every scenario, the crowd included (over 10 s when the
            # machine is loaded): it must end at the SIGTERM's drain, not at its idle_timeout
            pool={"idle_timeout": "300s"},
        )
        trusted = 'accept_proxy = "required"\ntrusted_proxies = ["127.0.0.1/32"]\n'
        trusted += 'proxy_header_timeout = "1s"\n'
        text += _listener("trusted", ports["trusted"], [eb.address], listener=trusted)
        text += _listener("silent", ports["silent"], [sb.address])
        text += _listener("reset", ports["reset"], [rb.address])
        dead = [f"127.0.0.1:{dead_port()}", f"127.0.0.1:{dead_port()}"]
        text += _listener("dead", ports["dead"], dead, pool="retries = 2\n")
        # generous timeouts: on a loaded machine the crowd's backend and client are slow
        crowd = [f"127.0.0.1:{crowd_port}"]
        text += _listener("crowd", ports["crowd"], crowd, timeouts="30s")
        lb = start_l4lb(tmp_path / "lb", text)
        try:
            keeper = connect(ports["main"])
            keeper.sendall(b"before")
            assert keeper.recv(100) == b"before"

            for _ in range(30):  # connect and close at once, with FIN and with RST
                connect(ports["main"]).close()
                s = connect(ports["trusted"])
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            for payload, _ in BAD_HEADERS:
                assert _attempt(ports["trusted"], payload) in (b"", "ConnectionResetError")
            s = connect(ports["trusted"])  # silent where a header is required
            t0 = time.monotonic()
            assert recv_all(s) == b""
            assert time.monotonic() - t0 < 10
            s.close()
            assert _attempt(ports["reset"], b"hi") in (b"", "ConnectionResetError")
            assert _attempt(ports["silent"], b"hi") == b""  # closed at idle_timeout
            assert _attempt(ports["dead"], b"hi") in (b"", "ConnectionResetError")
            assert _crowd(ports["crowd"]) == CROWD

            keeper.sendall(b"after")
            assert keeper.recv(100) == b"after"  # the established connection never noticed
            held = connect(ports["silent"])  # still open at SIGTERM: closed at drain_timeout
            held.sendall(b"x")
            t0 = time.monotonic()
            assert lb.stop(timeout=20) == 0
            assert time.monotonic() - t0 < 10
            held.close()
            keeper.close()
        finally:
            stop_process(lb.proc)
            stop_process(crowd_backend)

    log = lb.log_text()
    assert "Traceback" not in log, log[-3000:]
    assert "Traceback" not in (tmp_path / "crowd-backend.log").read_text()
    lines = lb.access_lines()
    ends = Counter((line["listener"], line.get("end") or line.get("reason")) for line in lines)
    for _, reason in BAD_HEADERS:
        assert ends[("trusted", reason)] == 1, ends
    assert ends[("trusted", "header_timeout")] == 1, ends
    assert ends[("main", "client_closed")] >= 30, ends
    assert ends[("reset", "reset")] == 1, ends
    assert ends[("silent", "idle_timeout")] == 1, ends
    assert ends[("silent", "shutdown")] == 1, ends
    assert ends[("main", "shutdown")] == 1, ends  # the keeper, closed at the end of the drain
    assert ends[("dead", "connect_failed")] == 1, ends
    assert ends[("crowd", "backend_closed")] == CROWD, ends
    failed = next(line for line in lines if line.get("end") == "connect_failed")
    assert "Connection refused" in failed["detail"]
    for line in lines:
        assert {"event", "listener", "time"} <= line.keys()
        if line["event"] == "connection":
            assert {"client", "backend", "bytes_from_client", "bytes_to_client", "duration"} <= (
                line.keys()
            )
        else:
            assert line["event"] == "rejected" and line["reason"] and line["detail"], line
