"""Version 1 (text) headers: ``PROXY <TCP4|TCP6|UNKNOWN> <src> <dst> <sport> <dport>\\r\\n``.

Strict as HAProxy: at most 107 bytes with the CRLF, exactly one space between fields, upper-case
protocol, addresses in the family's own text form (no leading zeros, no zone ids), ports as
ASCII digits 0-65535 without sign or leading zero.
"""

from __future__ import annotations

from socket import AF_INET, AF_INET6, inet_ntop, inet_pton
from typing import Final

from l4lb.proxy_protocol.errors import IncompleteHeader, InvalidHeader, Reason
from l4lb.proxy_protocol.model import Command, Family, ProxyHeader, Transport, make_header
from l4lb.proxy_protocol.options import ParseOptions
from l4lb.proxy_protocol.v2 import ipv6_text

SIGNATURE = b"PROXY"
MAX_LENGTH = 107  # "PROXY UNKNOWN ffff:...:ffff ffff:...:ffff 65535 65535\r\n"

_PROXY = Command.PROXY
_INET = Family.INET
_INET6 = Family.INET6
_STREAM = Transport.STREAM


def scan(data: bytes | bytearray, start: int = 0) -> int | None:
    """Scan ``data[start:]`` of a v1 header for its end; the header length once the CRLF is in.

    Raises InvalidHeader for a lone CR or LF, a bad 6th byte, or 107 bytes without a CRLF.
    ``start`` lets an incremental reader scan only the bytes it has not seen (it must be a
    position already scanned, or 0).
    """
    n = len(data)
    if start <= 5 < n and data[5] != 0x20:
        raise InvalidHeader(Reason.BAD_SIGNATURE, "'PROXY' must be followed by one space")
    window = min(n, MAX_LENGTH)
    lo = max(start - 1, 0)
    end = data.find(b"\r\n", lo, window)
    stop = window if end < 0 else end
    if data.find(b"\n", lo, stop) >= 0:
        raise InvalidHeader(Reason.BAD_CRLF, "line feed without a carriage return before it")
    cr = data.find(b"\r", lo, stop)
    if 0 <= cr < (stop if end >= 0 else window - 1):
        raise InvalidHeader(Reason.BAD_CRLF, "carriage return not followed by a line feed")
    if end >= 0:
        return end + 2
    if n >= MAX_LENGTH:
        raise InvalidHeader(
            Reason.TOO_LONG, f"no CRLF within the first {MAX_LENGTH} bytes of a v1 header"
        )
    return None


def v1_line_length(peeked: bytes | bytearray) -> int | None:
    """The length of the v1 header (CRLF included) at the start of ``peeked``, or None.

    For readers that ``MSG_PEEK`` a socket: a v1 header's end cannot be known before its CRLF,
    so peek, call this, and ``recv`` exactly the returned number of bytes. Raises
    InvalidHeader when the peeked bytes can no longer become a valid line (e.g. 107 bytes and
    no CRLF).
    """
    return scan(peeked)


_V4_TEXT: dict[bytes, str] = {}
"""Validated IPv4 address field -> its text, for the addresses seen last (see v2's
``_V6_TEXT``): a look-up instead of a decode and an ``inet_pton``. Holds only fields that
``inet_pton`` accepted, keyed by their exact bytes; emptied when it reaches ``V4_TEXT_MAX``."""
V4_TEXT_MAX = 1024
_v4_cached = _V4_TEXT.get


def dotted_quad(raw: bytes) -> bool:
    """Whether ``raw`` is an IPv4 address as glibc's ``inet_pton(AF_INET)`` accepts it: four
    decimal parts of 0-255 separated by single dots, no leading zero, nothing else. Checked
    byte by byte, without a call into the socket module (compiled: see ``_BYTE_CHECK``); the
    tests hold it equal to ``inet_pton`` on every kind of field."""
    n = len(raw)
    if n < 7 or n > 15:
        return False
    dots = 0
    value = 0
    digits = 0
    for i in range(n):
        c = raw[i]
        if c == 0x2E:  # "."
            if digits == 0 or dots == 3:
                return False
            dots += 1
            value = 0
            digits = 0
        elif 0x30 <= c <= 0x39:
            if digits > 0 and value == 0:  # a leading zero
                return False
            value = value * 10 + (c - 0x30)
            if value > 255:
                return False
            digits += 1
        else:
            return False
    return dots == 3 and digits > 0


_BYTE_CHECK: Final = not __file__.endswith(".py")
"""Check a new IPv4 field with :func:`dotted_quad` when this module is compiled (about 60 ns
against ``inet_pton``'s 120), with ``inet_pton`` in pure Python (where the loop takes 2 µs)."""


def _v4_new(raw: bytes) -> str:
    """The text of a v1 IPv4 field not in the cache (and now in it); raises OSError or
    ValueError when it is not a dotted quad, which is never cached."""
    if _BYTE_CHECK:
        if not dotted_quad(raw):
            raise ValueError("not an IPv4 address")
        text = raw.decode("ascii")
    else:
        text = raw.decode()  # a non-ASCII character passes here but never inet_pton
        inet_pton(AF_INET, text)  # glibc's is strict: 4 decimal parts, no leading zeros
    if len(_V4_TEXT) >= V4_TEXT_MAX:
        _V4_TEXT.clear()
    _V4_TEXT[raw] = text
    return text


def _port(raw: bytes) -> int:
    if not (0 < len(raw) <= 5 and raw.isdigit()) or (raw[0] == 0x30 and len(raw) > 1):
        raise InvalidHeader(
            Reason.BAD_PORT, f"port {raw!r} is not a decimal 0-65535 without leading zero"
        )
    port = int(raw)
    if port > 65535:
        raise InvalidHeader(Reason.BAD_PORT, f"port {port} is above 65535")
    return port


def _ipv4(raw: bytes) -> str:
    try:
        text = raw.decode("ascii")
        inet_pton(AF_INET, text)  # glibc's is strict: 4 decimal parts, no leading zeros
    except (UnicodeDecodeError, OSError, ValueError) as err:
        raise InvalidHeader(Reason.BAD_ADDRESS, f"{raw!r} is not an IPv4 address") from err
    return text


def _ipv6(raw: bytes, options: ParseOptions) -> str:
    try:
        packed = inet_pton(AF_INET6, raw.decode("ascii"))  # no zone ids ('%') accepted
    except (UnicodeDecodeError, OSError, ValueError) as err:
        if options.allow_ipv4_in_tcp6 and b":" not in raw:
            v4 = _ipv4(raw)
            return ipv6_text(b"\0" * 10 + b"\xff\xff" + inet_pton(AF_INET, v4))
        raise InvalidHeader(Reason.BAD_ADDRESS, f"{raw!r} is not an IPv6 address") from err
    text = inet_ntop(AF_INET6, packed)
    if "." in text:
        return ipv6_text(packed)
    return text


def parse_line(line: bytes, options: ParseOptions, end: int = -2) -> ProxyHeader:
    """The header from one scanned line: ``line[:end]`` is ``PROXY ...`` without the CRLF."""
    parts = line[6:end].split(b" ")
    proto = parts[0]
    if len(parts) == 5:
        if proto == b"TCP4":
            return make_header(
                1,
                _PROXY,
                _INET,
                _STREAM,
                (_ipv4(parts[1]), _port(parts[3])),
                (_ipv4(parts[2]), _port(parts[4])),
            )
        if proto == b"TCP6":
            return make_header(
                1,
                _PROXY,
                _INET6,
                _STREAM,
                (_ipv6(parts[1], options), _port(parts[3])),
                (_ipv6(parts[2], options), _port(parts[4])),
            )
    if proto == b"UNKNOWN":
        if len(parts) > 1 and not options.allow_v1_unknown_long:
            raise InvalidHeader(
                Reason.BAD_SYNTAX, "addresses after UNKNOWN are not allowed by the options"
            )
        return make_header(1, _PROXY, Family.UNSPEC, Transport.UNSPEC, None, None)
    if proto in (b"TCP4", b"TCP6") or len(parts) != 5 or not proto:
        # Not the shape "PROXY <protocol> <src> <dst> <sport> <dport>": a syntax error, whatever
        # the first word is; bad_family is kept for a well-formed line with an unknown protocol.
        if proto not in (b"TCP4", b"TCP6"):
            raise InvalidHeader(
                Reason.BAD_SYNTAX,
                f"expected 'PROXY <TCP4|TCP6> <src> <dst> <sport> <dport>' or 'PROXY UNKNOWN', "
                f"got {len(parts)} field(s) after 'PROXY ' starting {proto[:16]!r}",
            )
        raise InvalidHeader(
            Reason.BAD_SYNTAX,
            f"{proto.decode()} needs 4 fields after it separated by exactly one space, "
            f"got {len(parts) - 1}",
        )
    raise InvalidHeader(Reason.BAD_FAMILY, f"protocol {proto[:16]!r} is not TCP4, TCP6 or UNKNOWN")


def parse_v1(data: bytes, options: ParseOptions) -> tuple[ProxyHeader, int]:
    """The v1 header at the start of ``data`` (which starts with ``PROXY``)."""
    end = data.find(b"\r\n", 0, MAX_LENGTH)
    if end > 6:  # (not data[6:end] with end < 6: a mypyc build's slice refuses start > stop)
        # Fast path: the common well-formed TCP4/TCP6 line, validated field by field in one go.
        # A line accepted here has no stray CR/LF (each field matched its strict syntax); any
        # failure goes to the careful path below, which also names the error.
        parts = data[6:end].split(b" ")
        if len(parts) == 5 and data[5] == 0x20:
            proto, src, dst, sport, dport = parts
            if (
                0 < len(sport) <= 5
                and 0 < len(dport) <= 5
                and sport.isdigit()
                and dport.isdigit()
                and (sport[0] != 0x30 or len(sport) == 1)
                and (dport[0] != 0x30 or len(dport) == 1)
            ):
                sp = int(sport)
                dp = int(dport)
                if sp <= 65535 and dp <= 65535:
                    try:
                        if proto == b"TCP4":
                            s = _v4_cached(src) or _v4_new(src)
                            d = _v4_cached(dst) or _v4_new(dst)
                            header = make_header(1, _PROXY, _INET, _STREAM, (s, sp), (d, dp))
                            return header, end + 2
                        if proto == b"TCP6":
                            s = ipv6_text(inet_pton(AF_INET6, src.decode()))
                            d = ipv6_text(inet_pton(AF_INET6, dst.decode()))
                            header = make_header(1, _PROXY, _INET6, _STREAM, (s, sp), (d, dp))
                            return header, end + 2
                    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
                        pass
    length = scan(data)
    if length is None:
        raise IncompleteHeader(f"v1 header has no CRLF yet ({len(data)} bytes)")
    return parse_line(data, options, length - 2), length
