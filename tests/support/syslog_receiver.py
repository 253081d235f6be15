"""Syslog receivers for tests: real sockets the test reads, and a strict RFC 5424 parser.

    with SyslogReceiver.udp() as rx:          # or .tcp(), .unix_dgram(path), .unix_stream(path)
        ...  # rx.target is the l4lb config value ('syslog+udp://127.0.0.1:PORT')
        rx.wait(1)  # -> [Rfc5424, ...]

Every message received is parsed with :func:`parse` (the RFC 5424 section 6 ABNF, nothing
lenient); a frame that does not parse is kept in ``rx.errors``, so a test that expects none
fails on a cut or garbled message instead of skipping it. TCP frames are read as RFC 6587
octet counting (``LEN SP MSG``), strictly; a unix stream's messages end with NUL.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.support.peers import free_port, wait_for

_SD_NAME = rb"[\x21\x23-\x3c\x3e-\x5c\x5e-\x7e]{1,32}"
"""An SD-ID or PARAM-NAME: 1..32 PRINTUSASCII except '=', ']', '"' (RFC 5424 section 6.3)."""
_HEADER = re.compile(
    rb"<(?P<pri>0|[1-9]\d{0,2})>(?P<version>[1-9]\d{0,2}) "
    rb"(?P<timestamp>-|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)) "
    rb"(?P<hostname>[\x21-\x7e]{1,255}) "
    rb"(?P<app_name>[\x21-\x7e]{1,48}) "
    rb"(?P<procid>[\x21-\x7e]{1,128}) "
    rb"(?P<msgid>[\x21-\x7e]{1,32}) "
    rb"(?P<sd>-|(?:\[" + _SD_NAME + rb"(?: " + _SD_NAME + rb"=\"(?:[^\"\\\]]|\\.)*\")*\])+)"
    rb"(?: (?P<msg>.*))?\Z",
    re.DOTALL,
)


@dataclass(frozen=True)
class Rfc5424:
    """One parsed message."""

    facility: int
    severity: int
    version: int
    timestamp: datetime
    timestamp_text: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    sd: str
    msg: bytes

    def json(self) -> Any:
        import json

        return json.loads(self.msg)


class ParseError(ValueError):
    pass


def parse(data: bytes) -> Rfc5424:
    """One RFC 5424 message, strictly; ParseError saying what is wrong otherwise."""
    m = _HEADER.match(data)
    if m is None:
        raise ParseError(f"not an RFC 5424 message: {data[:200]!r}")
    pri = int(m["pri"])
    if pri > 191:
        raise ParseError(f"PRI {pri} > 191")
    text = m["timestamp"].decode()
    if text == "-":
        raise ParseError("no TIMESTAMP")
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as err:
        raise ParseError(f"bad TIMESTAMP {text!r}: {err}") from None
    if when.tzinfo is None:
        raise ParseError(f"TIMESTAMP without offset: {text!r}")
    msg = m["msg"] or b""
    msg.decode("utf-8")  # UnicodeDecodeError (a ValueError) on a character cut in half
    return Rfc5424(
        facility=pri >> 3,
        severity=pri & 7,
        version=int(m["version"]),
        timestamp=when,
        timestamp_text=text,
        hostname=m["hostname"].decode(),
        app_name=m["app_name"].decode(),
        procid=m["procid"].decode(),
        msgid=m["msgid"].decode(),
        sd=m["sd"].decode(),
        msg=msg,
    )


class SyslogReceiver:
    """A collector on a real socket; a thread reads it. Use the constructors below."""

    def __init__(self, kind: str, sock: socket.socket, target: str) -> None:
        self.kind = kind
        self.sock = sock
        self.target = target
        self.raw: list[bytes] = []
        self.messages: list[Rfc5424] = []
        self.errors: list[str] = []
        self.connections = 0
        """Stream connections accepted so far."""
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    # -- constructors ----------------------------------------------------------------------

    @classmethod
    def udp(cls, host: str = "127.0.0.1", port: int | None = None) -> SyslogReceiver:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, port or free_port(host)))
        return cls("udp", sock, f"syslog+udp://{host}:{sock.getsockname()[1]}")

    @classmethod
    def tcp(cls, host: str = "127.0.0.1", port: int | None = None) -> SyslogReceiver:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port or free_port(host)))
        sock.listen(16)
        return cls("tcp", sock, f"syslog+tcp://{host}:{sock.getsockname()[1]}")

    @classmethod
    def unix_dgram(cls, path: Path) -> SyslogReceiver:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        return cls("unix_dgram", sock, f"syslog:{path}")

    @classmethod
    def unix_stream(cls, path: Path) -> SyslogReceiver:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen(16)
        return cls("unix_stream", sock, f"syslog:{path}")

    # -- reading ---------------------------------------------------------------------------

    def _add(self, data: bytes) -> None:
        with self._lock:
            self.raw.append(data)
            try:
                self.messages.append(parse(data))
            except ValueError as err:
                self.errors.append(str(err))

    def _serve(self) -> None:
        self.sock.settimeout(0.1)  # to see close(): a blocked recv() is not woken by it
        if self.kind in ("udp", "unix_dgram"):
            while not self._closed:
                try:
                    data = self.sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not self._closed:
                    self._add(data)
            return
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self.connections += 1
                self._conns.append(conn)
            reader = self._octets if self.kind == "tcp" else self._nul_ended
            threading.Thread(target=reader, args=(conn,), daemon=True).start()

    def _read(
        self, conn: socket.socket, frames: Callable[[bytes], bytes | None], what: str
    ) -> None:
        """Feed ``conn``'s bytes to ``frames`` (which takes the complete messages out of the
        buffer and gives back the rest, or None on a framing error) until the peer closes."""
        buf = b""
        while True:
            try:
                chunk = conn.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                if buf:
                    self._error(f"connection ended inside a {what}: {buf[:80]!r}")
                return
            rest = frames(buf + chunk)
            if rest is None:
                return
            buf = rest

    def _octets(self, conn: socket.socket) -> None:
        """RFC 6587 3.4.1: MSG-LEN (a nonzero digit, then digits) SP SYSLOG-MSG, strictly."""
        self._read(conn, self._octet_frames, "frame")

    def _octet_frames(self, buf: bytes) -> bytes | None:
        while buf:
            space = buf.find(b" ")
            if space < 0:
                if not buf.isdigit() or len(buf) > 10:
                    self._error(f"bad frame length {buf[:20]!r}")
                    return None
                break
            length_text = buf[:space]
            if not re.fullmatch(rb"[1-9]\d{0,9}", length_text):
                self._error(f"bad frame length {length_text[:20]!r}")
                return None
            length = int(length_text)
            if len(buf) < space + 1 + length:
                break
            self._add(buf[space + 1 : space + 1 + length])
            buf = buf[space + 1 + length :]
        return buf

    def _nul_ended(self, conn: socket.socket) -> None:
        self._read(conn, self._nul_frames, "message")

    def _nul_frames(self, buf: bytes) -> bytes:
        *done, rest = buf.split(b"\0")
        for data in done:
            self._add(data)
        return rest

    def _error(self, text: str) -> None:
        with self._lock:
            self.errors.append(text)

    # -- the test's side -------------------------------------------------------------------

    def wait(self, count: int, timeout: float = 15.0) -> list[Rfc5424]:
        """At least ``count`` messages (fewer if they did not come in ``timeout``)."""
        wait_for(lambda: len(self.messages) >= count, timeout)
        with self._lock:
            return list(self.messages)

    def drop_connections(self) -> None:
        """Close every accepted connection (a collector restarting), keep listening."""
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def close(self) -> None:
        self._closed = True
        self._thread.join(5)
        self.sock.close()
        self.drop_connections()

    def __enter__(self) -> SyslogReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["ParseError", "Rfc5424", "SyslogReceiver", "parse"]
