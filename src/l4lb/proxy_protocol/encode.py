"""Building headers: ``encode`` for a ProxyHeader, ``build`` for the balancer's hot path."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Sequence
from socket import AF_INET, AF_INET6, inet_pton
from typing import Any, Final, overload

from l4lb.proxy_protocol.checksum import crc32c as _crc32c
from l4lb.proxy_protocol.errors import InvalidHeader, Reason
from l4lb.proxy_protocol.model import (
    ADDRESS_SIZES,
    Address,
    Command,
    Family,
    ProxyHeader,
    TLVType,
    Transport,
)
from l4lb.proxy_protocol.tlv import TLVLike, encode_tlvs
from l4lb.proxy_protocol.v2 import SIGNATURE

# ``Final``: compiled (pyproject.toml [tool.l4lb] compiled), a plain module name is a dict
# look-up on every read
_FIXED: Final = struct.Struct("!12sBBH")
_INET: Final = struct.Struct("!4s4sHH")
_INET6: Final = struct.Struct("!16s16sHH")
_TCP4_HEAD: Final = SIGNATURE + b"\x21\x11\x00\x0c"
_TCP6_HEAD: Final = SIGNATURE + b"\x21\x21\x00\x24"
_CRC_PLACEHOLDER: Final = b"\x03\x00\x04\x00\x00\x00\x00"
_V4_MAPPED: Final = b"\0" * 10 + b"\xff\xff"
_T_CRC: Final = int(TLVType.CRC32C)

_LOCAL_V2: Final = SIGNATURE + b"\x20\x00\x00\x00"
_LOCAL_V1: Final = b"PROXY UNKNOWN\r\n"

_CACHE_MAX: Final = 4096
_packed_cache: Final[dict[str, tuple[int, bytes]]] = {}


def local_header(version: int = 2) -> bytes:
    """A header that says "no client address": v2 LOCAL, or v1 ``PROXY UNKNOWN``."""
    return _LOCAL_V1 if version == 1 else _LOCAL_V2


def _pack_host(host: object) -> tuple[int, bytes]:
    """(4 or 6, packed address) for socket-style host text, cached (listener addresses repeat)."""
    if type(host) is not str:
        raise InvalidHeader(Reason.UNENCODABLE, f"host must be str, not {type(host).__name__}")
    hit = _packed_cache.get(host)
    if hit is not None:
        return hit
    try:
        if ":" in host:
            result = (6, inet_pton(AF_INET6, host.split("%", 1)[0]))
        else:
            result = (4, inet_pton(AF_INET, host))
    except (OSError, ValueError, TypeError) as err:
        raise InvalidHeader(Reason.UNENCODABLE, f"{host!r} is not an IP address") from err
    if len(_packed_cache) >= _CACHE_MAX:
        _packed_cache.clear()
    _packed_cache[host] = result
    return result


def _v6_text(host: str, packed: bytes) -> str:
    if "%" in host or "." in host:
        return ipaddress.IPv6Address(packed).compressed
    return host


def _check_port(port: object) -> None:
    if not (type(port) is int and 0 <= port <= 65535):
        raise InvalidHeader(Reason.UNENCODABLE, f"port {port!r} is not an integer 0-65535")


@overload
def build(
    version: int,
    source: Address,
    destination: Address,
    *,
    tlvs: Sequence[TLVLike] = (),
    crc32c: bool = False,
) -> bytes: ...


@overload
def build(
    version: int,
    source: tuple[str, int, int, int],
    destination: tuple[str, int, int, int],
    *,
    tlvs: Sequence[TLVLike] = (),
    crc32c: bool = False,
) -> bytes: ...


# Compiled with mypyc (pyproject.toml [tool.l4lb] compiled): the implementation's parameters
# are loose (mypyc checks a declared tuple[str, int] on entry and would raise TypeError where the
# checks below raise the project's error); the overloads above are what callers are held to.
def build(
    version: object,
    source: Sequence[Any],
    destination: Sequence[Any],
    *,
    tlvs: Sequence[TLVLike] = (),
    crc32c: object = False,
) -> bytes:
    """A PROXY header for a TCP connection from ``source`` to ``destination``.

    The per-connection fast path: ``(host, port)`` as sockets give them (``getpeername()[:2]``).
    Both IPv4 gives TCP4, both IPv6 gives TCP6; a mix (IPv4 client on an IPv6 listener) sends
    TCP6 with the IPv4 side as ``::ffff:a.b.c.d``. v1 ignores ``tlvs`` and ``crc32c`` is v2 only.
    """
    shost, sport = source[0], source[1]
    dhost, dport = destination[0], destination[1]
    sfam, spacked = _pack_host(shost)
    dfam, dpacked = _pack_host(dhost)
    if not (type(sport) is int and 0 <= sport <= 65535):
        _check_port(sport)
    if not (type(dport) is int and 0 <= dport <= 65535):
        _check_port(dport)
    if version == 1:
        if tlvs:
            raise InvalidHeader(Reason.UNENCODABLE, "v1 headers cannot carry TLVs")
        if sfam == dfam == 4:
            return b"PROXY TCP4 %s %s %d %d\r\n" % (
                shost.encode(),
                dhost.encode(),
                sport,
                dport,
            )
        s = _v6_text(shost, spacked) if sfam == 6 else "::ffff:" + shost
        d = _v6_text(dhost, dpacked) if dfam == 6 else "::ffff:" + dhost
        return b"PROXY TCP6 %s %s %d %d\r\n" % (s.encode(), d.encode(), sport, dport)
    if version != 2:
        raise InvalidHeader(Reason.UNENCODABLE, f"version {version!r} is not 1 or 2")
    if sfam == dfam == 4:
        if not tlvs and not crc32c:
            return _TCP4_HEAD + _INET.pack(spacked, dpacked, sport, dport)
        addr = _INET.pack(spacked, dpacked, sport, dport)
        fam = 0x11
    else:
        if sfam == 4:
            spacked = _V4_MAPPED + spacked
        if dfam == 4:
            dpacked = _V4_MAPPED + dpacked
        if not tlvs and not crc32c:
            return _TCP6_HEAD + _INET6.pack(spacked, dpacked, sport, dport)
        addr = _INET6.pack(spacked, dpacked, sport, dport)
        fam = 0x21
    return _assemble(0x21, fam, addr, tlvs, bool(crc32c))


def _assemble(ver_cmd: int, fam: int, addr: bytes, tlvs: Iterable[TLVLike], crc: bool) -> bytes:
    """Fixed part + addresses + TLVs, with any CRC32C TLV (re)computed."""
    items = list(tlvs)
    encoded = encode_tlvs(items)  # validates every item first
    has_crc = any(t[0] == _T_CRC for t in items)
    if crc and not has_crc:
        encoded += _CRC_PLACEHOLDER
        has_crc = True
    body = addr + encoded
    if len(body) > 0xFFFF:
        raise InvalidHeader(Reason.UNENCODABLE, f"v2 header body is {len(body)} bytes, max 65535")
    out = bytearray(_FIXED.pack(SIGNATURE, ver_cmd, fam, len(body)) + body)
    if has_crc:
        # Locate the CRC TLV by walking the records; zero it, checksum everything, patch it in.
        pos = 16 + len(addr)
        end = len(out)
        while pos + 3 <= end:
            t = out[pos]
            length = (out[pos + 1] << 8) | out[pos + 2]
            if t == _T_CRC:
                if length != 4:
                    raise InvalidHeader(Reason.UNENCODABLE, "a CRC32C TLV value must be 4 bytes")
                out[pos + 3 : pos + 7] = b"\0\0\0\0"
                out[pos + 3 : pos + 7] = _crc32c(out).to_bytes(4, "big")
                break
            pos += 3 + length
    return bytes(out)


def encode(header: ProxyHeader, *, crc32c: bool = False) -> bytes:
    """The wire form of ``header``: v1 text when ``header.version == 1``, else v2 binary.

    A CRC32C TLV already in ``header.tlvs`` is always recomputed; ``crc32c=True`` adds one when
    absent. Raises InvalidHeader (reason ``unencodable``) for a header that cannot be written.
    """
    if header.version == 1:
        return _encode_v1(header)
    if header.version != 2:
        raise InvalidHeader(Reason.UNENCODABLE, f"version {header.version!r} is not 1 or 2")
    return _encode_v2(header, crc32c)


def _encode_v1(h: ProxyHeader) -> bytes:
    if h.tlvs:
        raise InvalidHeader(Reason.UNENCODABLE, "v1 headers cannot carry TLVs")
    if h.command is Command.LOCAL or h.family is Family.UNSPEC:
        return _LOCAL_V1
    if h.family not in (Family.INET, Family.INET6) or h.transport is not Transport.STREAM:
        raise InvalidHeader(
            Reason.UNENCODABLE, f"v1 carries only TCP over IPv4/IPv6, not {h.family.name}"
        )
    src, dst, packed = _checked_ips(h)
    if h.family is Family.INET:
        proto, parts = b"TCP4", [src[0], dst[0]]
    else:
        proto, parts = b"TCP6", [_v6_text(src[0], packed[0]), _v6_text(dst[0], packed[1])]
    return b"PROXY %s %s %s %d %d\r\n" % (
        proto,
        parts[0].encode(),
        parts[1].encode(),
        src[1],
        dst[1],
    )


def _checked_ips(h: ProxyHeader) -> tuple[Address, Address, tuple[bytes, bytes]]:
    """Source, destination and their packed hosts; each host of the header's family, each port
    valid (shared by v1 and v2)."""
    # Any: compiled, a read typed as the field's union raises TypeError for a value outside it
    loose: Any = h
    src, dst = loose.source, loose.destination
    if not (isinstance(src, tuple) and isinstance(dst, tuple)):
        raise InvalidHeader(
            Reason.UNENCODABLE, f"{h.family.name} needs (host, port) source and destination"
        )
    want = 4 if h.family is Family.INET else 6
    packed = []
    for host, port in (src, dst):
        fam, p = _pack_host(host)
        if fam != want:
            raise InvalidHeader(Reason.UNENCODABLE, f"{host!r} does not match {h.family.name}")
        _check_port(port)
        packed.append(p)
    return src, dst, (packed[0], packed[1])


def _unix_bytes(path: object) -> bytes:
    if not isinstance(path, str):
        raise InvalidHeader(Reason.UNENCODABLE, "UNIX source and destination must be str paths")
    raw = path.encode("utf-8", "surrogateescape")
    if len(raw) > 108:
        raise InvalidHeader(Reason.UNENCODABLE, f"UNIX path is {len(raw)} bytes, max 108")
    return raw.ljust(108, b"\0")


def _encode_v2(h: ProxyHeader, crc: bool) -> bytes:
    fam = (int(h.family) << 4) | int(h.transport)
    size = ADDRESS_SIZES.get(fam)
    if size is None:
        raise InvalidHeader(
            Reason.UNENCODABLE, f"{h.family.name}/{h.transport.name} is not a valid v2 combination"
        )
    if h.command is Command.LOCAL or h.family is Family.UNSPEC:
        addr = b"\0" * size  # LOCAL: a dummy block so TLVs sit where the family says
    elif h.family is Family.UNIX:
        loose: Any = h  # as in _checked_ips
        addr = _unix_bytes(loose.source) + _unix_bytes(loose.destination)
    else:
        src, dst, packed = _checked_ips(h)
        st = _INET if h.family is Family.INET else _INET6
        addr = st.pack(packed[0], packed[1], src[1], dst[1])
    return _assemble(0x20 | int(h.command), fam, addr, h.tlvs, crc)
