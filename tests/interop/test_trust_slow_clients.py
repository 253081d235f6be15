"""Slow and hostile clients against the real balancer: split headers accepted, silent and
trickling clients closed at the header timeout, the oldest waiting dropped past
max_pending_headers, and an established connection undisturbed by all of it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from l4lb.proxy_protocol import build, parse
from tests.support.echo_backend import EchoBackend
from tests.support.l4lb import L4lb, config_text, l4lb
from tests.support.peers import connect_from, free_port, wait_for

V1 = b"PROXY TCP4 198.51.100.42 203.0.113.7 51000 443\r\n"
V2 = build(2, ("198.51.100.43", 51001), ("203.0.113.7", 443))


@contextmanager
def balancer(tmp_path: Path, **listener: object) -> Iterator[tuple[L4lb, EchoBackend]]:
    lb_port = free_port()
    with EchoBackend("echo") as backend:
        config = config_text(
            f"127.0.0.1:{lb_port}",
            [backend.address],
            pool={"send_proxy": "v2"},
            listener={"accept_proxy": "required", "trusted_proxies": ["127.0.0.1/32"], **listener},
        )
        with l4lb(tmp_path / "lb", config) as lb:
            yield lb, backend


def closed(sock: socket.socket, timeout: float = 10.0) -> float:
    """Wait for the balancer to close ``sock``; return when (monotonic)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic()


def read_echo(sock: socket.socket, payload: bytes) -> bytes:
    sock.settimeout(10)
    data = b""
    while len(data) < len(b"echo\n") + len(payload):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_headers_split_one_byte_at_a_time_are_accepted(tmp_path: Path) -> None:
    with balancer(tmp_path, proxy_header_timeout="10s") as (lb, backend):
        for header in (V1, V2):
            with connect_from("127.0.0.1", "127.0.0.1", lb.port) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for i in range(len(header)):
                    sock.sendall(header[i : i + 1])
                    time.sleep(0.01)
                time.sleep(0.1)
                sock.sendall(b"application bytes")
                assert read_echo(sock, b"application bytes") == b"echo\napplication bytes"
        assert wait_for(lambda: len(backend.headers) == 2, 10)
        sources = [parse(raw)[0].source for raw in backend.headers]
        assert sources == [("198.51.100.42", 51000), ("198.51.100.43", 51001)]
        assert [line["event"] for line in lb.wait_access(2)] == ["connection"] * 2


def test_silent_and_trickling_clients_closed_at_the_timeout(tmp_path: Path) -> None:
    with balancer(tmp_path, proxy_header_timeout="1s") as (lb, backend):
        silent = connect_from("127.0.0.1", "127.0.0.1", lb.port)
        trickling = connect_from("127.0.0.1", "127.0.0.1", lb.port)
        started = time.monotonic()
        stop = threading.Event()

        def trickle() -> None:
            for i in range(len(V1)):  # one byte every 300 ms: 15 s for the whole line
                if stop.wait(0.3):
                    return
                try:
                    trickling.sendall(V1[i : i + 1])
                except OSError:
                    return

        thread = threading.Thread(target=trickle)
        thread.start()
        try:
            silent_at = closed(silent) - started
            trickling_at = closed(trickling) - started
        finally:
            stop.set()
            thread.join()
            silent.close()
            trickling.close()
        assert 0.8 <= silent_at < 5, silent_at
        assert 0.8 <= trickling_at < 5, trickling_at
        rejected = lb.wait_access(2)
        assert [line["reason"] for line in rejected] == ["header_timeout"] * 2
        assert "within 1s" in rejected[0]["detail"]
        assert backend.headers == []  # nothing reached the backend
        # the stderr log is written by its own thread (it never blocks the loop): wait for it
        assert wait_for(lambda: lb.log_text().count("reason=header_timeout") == 2), lb.log_text()


def test_pending_overflow_drops_the_oldest_not_the_established(tmp_path: Path) -> None:
    with balancer(tmp_path, proxy_header_timeout="20s", max_pending_headers=3) as (lb, _):
        established = connect_from("127.0.0.1", "127.0.0.1", lb.port)
        established.sendall(V1 + b"first")
        assert read_echo(established, b"first") == b"echo\nfirst"

        waiting = []
        for _ in range(5):
            waiting.append(connect_from("127.0.0.1", "127.0.0.1", lb.port))
            time.sleep(0.05)  # accepted in this order
        try:
            started = time.monotonic()
            for sock in waiting[:2]:  # the two oldest: dropped now, long before the timeout
                assert closed(sock) - started < 5
            rejected = lb.wait_access(2)
            assert [line["reason"] for line in rejected] == ["pending_overflow"] * 2
            dropped_ports = sorted(int(line["peer"].rsplit(":", 1)[1]) for line in rejected)
            assert dropped_ports == sorted(s.getsockname()[1] for s in waiting[:2])
            # the three newest still wait, and one of them completes its header
            waiting[4].sendall(V2 + b"late")
            assert read_echo(waiting[4], b"late") == b"echo\nlate"
            # the established connection never noticed
            established.sendall(b" and more")
            assert established.recv(100) == b" and more"
        finally:
            established.close()
            for sock in waiting:
                sock.close()


def test_slowloris_flood_leaves_a_transfer_untouched(tmp_path: Path) -> None:
    """300 silent connections from 30 distinct sources against max_pending_headers = 100, while
    an established connection keeps echoing: it loses nothing, and the balancer keeps at most
    100 waiting (the rest dropped oldest first, then the survivors closed at the timeout)."""
    with balancer(
        tmp_path,
        proxy_header_timeout="2s",
        max_pending_headers=100,
        trusted_proxies=["127.0.0.0/8"],  # trusted sources (untrusted ones are closed at once)
    ) as (lb, _):
        established = connect_from("127.0.0.1", "127.0.0.1", lb.port)
        established.sendall(V1 + b"start")
        assert read_echo(established, b"start") == b"echo\nstart"
        flood: list[socket.socket] = []
        try:
            for i in range(300):
                flood.append(connect_from(f"127.0.1.{i % 30 + 1}", "127.0.0.1", lb.port))
                if i % 50 == 0:  # the transfer goes on during the flood
                    chunk = b"%d;" % i
                    established.sendall(chunk)
                    assert established.recv(100) == chunk
            lines = lb.wait_access(300, timeout=20)
            reasons = [line["reason"] for line in lines if line["event"] == "rejected"]
            assert reasons.count("pending_overflow") == 200
            assert reasons.count("header_timeout") == 100
            established.sendall(b"end")
            assert established.recv(100) == b"end"
        finally:
            established.close()
            for sock in flood:
                sock.close()
