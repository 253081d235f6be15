"""Read the server name (SNI) and ALPN offers from a TLS ClientHello, without decrypting.

Sans-IO: :func:`parse_client_hello` takes the bytes peeked so far and answers
:data:`NEED_DATA` (feed more), :data:`NOT_TLS` (the stream is something else), or a
:class:`ClientHello`. The balancer peeks (``MSG_PEEK``), so nothing is consumed: the backend
still receives the ClientHello byte for byte. Records are followed while the handshake message
spans several of them (RFC 8446 5.1); anything malformed is :data:`NOT_TLS`, never an exception.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

MAX_HELLO = 65536
"""A ClientHello longer than this is not waited for."""

_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_EXT_SNI = 0x0000
_EXT_ALPN = 0x0010


class Peek(enum.Enum):
    NEED_DATA = "need_data"
    NOT_TLS = "not_tls"


NEED_DATA = Peek.NEED_DATA
NOT_TLS = Peek.NOT_TLS


@dataclass(frozen=True, slots=True)
class ClientHello:
    server_name: str | None
    """The first host_name of the SNI extension, or None."""
    alpn: tuple[bytes, ...]
    """The protocols offered, in the client's order of preference."""


class _Malformed(Exception):
    pass


def _handshake_bytes(data: bytes) -> bytes | Peek:
    """Concatenate the handshake records' payloads until the ClientHello is complete."""
    out = bytearray()
    pos = 0
    while True:
        if len(data) - pos < 5:
            return NEED_DATA
        if data[pos] != _HANDSHAKE or data[pos + 1] != 0x03:
            return NOT_TLS
        length = int.from_bytes(data[pos + 3 : pos + 5])
        if length == 0 or length > 16384 + 2048:
            return NOT_TLS
        end = pos + 5 + length
        out += data[pos + 5 : end]
        if len(out) >= 4:
            if out[0] != _CLIENT_HELLO:
                return NOT_TLS
            need = 4 + int.from_bytes(out[1:4])
            if need > MAX_HELLO:
                return NOT_TLS
            if len(out) >= need:
                return bytes(out[:need])
        if end > len(data):
            return NEED_DATA
        pos = end


def parse_client_hello(data: bytes) -> ClientHello | Peek:
    """Parse the start of a TLS stream; see the module docstring for the three answers."""
    if data and data[0] != _HANDSHAKE:
        return NOT_TLS
    hs = _handshake_bytes(data)
    if isinstance(hs, Peek):
        return hs
    try:
        return _parse_body(memoryview(hs)[4:])
    except _Malformed:
        return NOT_TLS


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise _Malformed
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n))

    def vector(self, len_bytes: int) -> memoryview:
        return self.take(self.uint(len_bytes))

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos


def _parse_body(body: memoryview) -> ClientHello:
    r = _Reader(body)
    r.take(2 + 32)  # legacy_version, random
    r.vector(1)  # session id
    r.vector(2)  # cipher suites
    r.vector(1)  # compression methods
    server_name: str | None = None
    alpn: tuple[bytes, ...] = ()
    if r.left == 0:
        return ClientHello(None, ())
    exts = _Reader(r.vector(2))
    while exts.left:
        ext_type = exts.uint(2)
        ext = _Reader(exts.vector(2))
        if ext_type == _EXT_SNI and server_name is None:
            names = _Reader(ext.vector(2))
            while names.left:
                kind = names.uint(1)
                name = bytes(names.vector(2))
                if kind == 0 and server_name is None:
                    try:
                        server_name = name.decode("ascii")
                    except UnicodeDecodeError as err:
                        raise _Malformed from err
        elif ext_type == _EXT_ALPN and not alpn:
            protos = _Reader(ext.vector(2))
            found = []
            while protos.left:
                proto = bytes(protos.vector(1))
                if not proto:
                    raise _Malformed
                found.append(proto)
            alpn = tuple(found)
    return ClientHello(server_name, alpn)
