"""Real backends for balancer tests: threaded TCP servers that read the PROXY header first."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from l4lb.proxy_protocol import HeaderReader, ProxyHeader
from tests.support.peers import free_port

Handler = Callable[[socket.socket, ProxyHeader | None, bytes], None]


@dataclass
class Seen:
    """What a backend saw on one connection."""

    header: ProxyHeader | None
    peer: tuple[str, int]
    received: bytes = b""
    digest: str = ""
    count: int = 0
    error: str = ""
    closed: threading.Event = field(default_factory=threading.Event)


class Backend:
    """A backend on a free loopback port; ``handler(sock, header, early_bytes)`` per connection."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", proxy: bool = True) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.host = host
        self.port: int = self.sock.getsockname()[1]
        self.handler = handler
        self.proxy = proxy
        self.seen: list[Seen] = []
        self.current: Seen | None = None
        self._stop = False
        self._threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(target=self._accept, daemon=True)
        self._accept_thread.start()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn, peer), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        seen = Seen(None, peer[:2])
        self.seen.append(seen)
        conn.settimeout(30)
        try:
            header, early = (None, b"")
            if self.proxy:
                reader = HeaderReader()
                while header is None:
                    chunk = conn.recv(reader.next_read_size())
                    if not chunk:
                        seen.error = "closed before the header"
                        return
                    header = reader.feed(chunk)
                early = reader.trailing
            seen.header = header
            self.current = seen
            self.handler(conn, header, early)
        except Exception as err:  # recorded for the test to look at
            seen.error = repr(err)
        finally:
            conn.close()
            seen.closed.set()

    def close(self) -> None:
        self._stop = True
        self.sock.close()

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def backend(handler: Handler, host: str = "127.0.0.1", proxy: bool = True) -> Iterator[Backend]:
    b = Backend(handler, host, proxy)
    try:
        yield b
    finally:
        b.close()


def recv_all(sock: socket.socket, limit: int | None = None) -> bytes:
    """Read until EOF (or ``limit`` bytes)."""
    out = bytearray()
    while limit is None or len(out) < limit:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        out += chunk
    return bytes(out)


def hash_until_eof(sock: socket.socket) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    while True:
        chunk = sock.recv(1 << 18)
        if not chunk:
            return h.hexdigest(), n
        h.update(chunk)
        n += len(chunk)


def echo(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
    """Echo every byte; on EOF, shut down writing and finish."""
    if early:
        sock.sendall(early)
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            sock.shutdown(socket.SHUT_WR)
            return
        sock.sendall(chunk)


def hello(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
    """Say who the client is (from the header), then echo."""
    source = header.source if header is not None else None
    sock.sendall(f"client={source}\n".encode())
    echo(sock, header, early)


def reset(sock: socket.socket) -> None:
    """Close with a RST."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def dead_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on (connections are refused).

    From free_port, not ``bind(0)``: an ephemeral port could be bound by another test's
    listener a moment later, and then the "dead" backend answers.
    """
    return free_port(host)


def connect(port: int, source: str = "127.0.0.1", host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(20)
    s.bind((source, 0))
    s.connect((host, port))
    return s


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(connected, accepted) over loopback, as the balancer has them: the backend socket is the
    connected one, the client's the accepted one."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    return a, b


def new_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop (what the balancer runs), or asyncio's where uvloop is missing."""
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()
