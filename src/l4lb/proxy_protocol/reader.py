"""The incremental decoder: feed it reads as they come, it answers "not yet" or the header.

It keeps its place between feeds (it never re-scans bytes it has seen), gives the same answer
whether the header arrives whole or one byte at a time, and hands back untouched every byte
that followed the header.
"""

from __future__ import annotations

from l4lb.proxy_protocol.errors import IncompleteHeader, NotProxyProtocol, ProxyProtocolError
from l4lb.proxy_protocol.model import ProxyHeader
from l4lb.proxy_protocol.options import DEFAULT_OPTIONS, ParseOptions
from l4lb.proxy_protocol.parse import Buffer, parse, sniff
from l4lb.proxy_protocol.v1 import parse_line
from l4lb.proxy_protocol.v1 import scan as v1_scan
from l4lb.proxy_protocol.v2 import FIXED, check_prefix, parse_v2

# The shortest possible headers: "PROXY UNKNOWN\r\n" (15) and a bare v2 fixed part (16).
_MIN_ANY = 15
_V1_MIN = {b"PROXY TCP4 ": 32, b"PROXY TCP6 ": 22}


class HeaderReader:
    """Incremental PROXY header decoder (sans-IO).

    ``feed(chunk)`` returns None until the header is complete, then the ProxyHeader; after
    that ``header``, ``consumed`` (the header's length) and ``trailing`` (exactly the bytes fed
    after the header) are set. Errors are ProxyProtocolError and are raised again by any later
    ``feed``. ``next_read_size()`` says how many bytes a socket reader may take now without
    reading past the header: exact for v2 once its 16-byte fixed part is in; for v1 the end
    is unknown until the CRLF, so it returns a safe lower bound (1 or 2 near the end) — a v1
    reader that must not over-read should ``MSG_PEEK`` and use ``v1_line_length`` instead.
    """

    __slots__ = (
        "_buf",
        "_error",
        "_options",
        "_scanned",
        "_total",
        "_version",
        "consumed",
        "header",
        "trailing",
    )

    def __init__(self, options: ParseOptions = DEFAULT_OPTIONS) -> None:
        self._options = options
        self._buf = bytearray()
        self._version: int | None = None
        self._scanned = 0
        self._total: int | None = None
        self._error: ProxyProtocolError | None = None
        self.header: ProxyHeader | None = None
        self.trailing = b""
        self.consumed = 0

    @property
    def done(self) -> bool:
        return self.header is not None

    @property
    def version(self) -> int | None:
        """1 or 2 once the signature is recognised."""
        return self._version

    @property
    def buffered(self) -> int:
        """Bytes held while the header is incomplete."""
        return len(self._buf)

    def feed(self, chunk: Buffer) -> ProxyHeader | None:
        """Add ``chunk``; the header once complete, else None. Raises ProxyProtocolError."""
        if self.header is not None:
            if chunk:
                self.trailing += bytes(chunk)
            return self.header
        if self._error is not None:
            raise self._error
        if self._version is None and not self._buf and len(chunk) >= _MIN_ANY:
            # Usual case: the whole header arrives in the first read. Parse it in one go; only
            # a partial header falls through to the incremental path below (which then scans
            # these bytes once more, and never again).
            try:
                header, length = parse(chunk, self._options)
            except IncompleteHeader:
                pass
            except ProxyProtocolError as err:
                self._error = err
                raise
            else:
                self.trailing = bytes(chunk[length:])
                self.consumed = length
                self.header = header
                return header
        try:
            return self._feed(chunk)
        except ProxyProtocolError as err:
            self._error = err
            self._buf = bytearray()
            raise

    def _feed(self, chunk: Buffer) -> ProxyHeader | None:
        buf = self._buf
        buf += chunk
        if self._version is None:
            version = sniff(buf)
            if version is None:
                return None
            if version == 0:
                raise NotProxyProtocol(f"data starts with {bytes(buf[:12])!r}")
            self._version = version
        if self._version == 2:
            total = self._total
            if total is None:
                total = check_prefix(buf, self._options.max_v2_size)
                if total is None:
                    return None
                self._total = total
            if len(buf) < total:
                return None
            header, _ = parse_v2(bytes(buf[:total]), self._options)
            return self._finish(header, total)
        length = v1_scan(buf, self._scanned)
        self._scanned = len(buf)
        if length is None:
            return None
        return self._finish(parse_line(bytes(buf[:length]), self._options), length)

    def _finish(self, header: ProxyHeader, length: int) -> ProxyHeader:
        self.trailing = bytes(self._buf[length:])
        self._buf = bytearray()
        self.consumed = length
        self.header = header
        return header

    def next_read_size(self) -> int:
        """Bytes that may be read now without reading past the header (0 once done)."""
        if self.header is not None or self._error is not None:
            return 0
        buf = self._buf
        n = len(buf)
        if self._version == 2:
            if self._total is not None:
                return self._total - n
            return FIXED - n
        if self._version == 1:
            least = _V1_MIN.get(bytes(buf[:11]), _MIN_ANY)
            if n < least:
                return least - n
            return 1 if buf[-1:] == b"\r" else 2
        if n and buf[0] == 0x0D:
            return FIXED - n
        return _MIN_ANY - n
