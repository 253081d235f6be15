"""The fleet test's clients: short connections opened in a loop, and long-lived ones that send a
request every 100 ms; both record every failure (reset, timeout, early close) with its time."""

from __future__ import annotations

import random
import socket
import threading
import time
from dataclasses import dataclass, field

from tests.fleet.topology import CLIENTS, PORT, VIP, Fleet
from tests.support.http import read_response

REQUEST = b"GET /%s HTTP/1.1\r\nHost: vip\r\n%s\r\n"


def _read_response(sock: socket.socket) -> bytes:
    status, body = read_response(sock)
    if status != 200:
        raise ConnectionError(f"unexpected status {status}")
    return body


def _kind(err: BaseException) -> str:
    if isinstance(err, ConnectionResetError):
        return "reset"
    if isinstance(err, TimeoutError | socket.timeout):
        return "timeout"
    if isinstance(err, ConnectionRefusedError):
        return "refused"
    return type(err).__name__


@dataclass
class Failure:
    at: float
    kind: str
    source: tuple[str, int] | None
    detail: str


class NewConnections:
    """Opens a connection, sends one request, reads the answer, closes; again every ``pause``."""

    def __init__(self, fleet: Fleet, pause: float = 0.02) -> None:
        self.fleet = fleet
        self.pause = pause
        self.ok = 0
        self.failures: list[Failure] = []
        self.sources: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> NewConnections:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def one(self) -> None:
        source = None
        sock = self.fleet.client_socket(random.choice(CLIENTS))
        try:
            sock.settimeout(3)
            source = sock.getsockname()
            sock.connect((VIP, PORT))
            sock.sendall(REQUEST % (b"new", b"Connection: close\r\n"))
            _read_response(sock)
            self.ok += 1
            self.sources.append(source)
        except OSError as err:
            self.failures.append(Failure(time.monotonic(), _kind(err), source, str(err)))
        finally:
            sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.one()
            self._stop.wait(self.pause)


@dataclass
class LongLived:
    """Connections that each send a request every ``interval`` on the same socket."""

    fleet: Fleet
    count: int
    interval: float = 0.1
    socks: list[socket.socket] = field(default_factory=list)
    requests: int = 0
    failures: list[Failure] = field(default_factory=list)
    failed: set[tuple[str, int]] = field(default_factory=set)

    def open(self) -> None:
        for k in range(self.count):
            sock = self.fleet.client_socket(CLIENTS[k % len(CLIENTS)])
            sock.settimeout(3)
            sock.connect((VIP, PORT))
            sock.sendall(REQUEST % (b"long", b""))
            _read_response(sock)
            self.socks.append(sock)

    def sources(self) -> list[tuple[str, int]]:
        return [s.getsockname() for s in self.socks]

    def run(self, seconds: float) -> None:
        """Send a request on every live connection each ``interval``, for ``seconds``."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.monotonic()
            self.round()
            time.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    def round(self) -> None:
        for sock in self.socks:
            source = sock.getsockname()
            if source in self.failed:
                continue
            try:
                sock.sendall(REQUEST % (b"long", b""))
                _read_response(sock)
                self.requests += 1
            except OSError as err:
                self.failed.add(source)
                self.failures.append(Failure(time.monotonic(), _kind(err), source, str(err)))

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.socks = []
