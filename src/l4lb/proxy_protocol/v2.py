"""Version 2 (binary) headers: 12-byte signature, ver/cmd, fam/proto, length, addresses, TLVs."""

from __future__ import annotations

import ipaddress
import struct
from socket import AF_INET, AF_INET6, inet_ntop

from l4lb.proxy_protocol.errors import IncompleteHeader, InvalidHeader, Reason
from l4lb.proxy_protocol.model import (
    ADDRESS_SIZES,
    Command,
    Family,
    ProxyHeader,
    Transport,
    make_header,
)
from l4lb.proxy_protocol.options import ParseOptions
from l4lb.proxy_protocol.tlv import check_tlvs

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
FIXED = 16

_LEN = struct.Struct("!H")
_INET = struct.Struct("!4s4sHH")
_INET_BYTES = struct.Struct("!8BHH")
_DEC = tuple(str(i) for i in range(256))
"""Decimal text of each byte: an IPv4 address is four lookups (half of ``inet_ntop``'s cost)."""
_INET6 = struct.Struct("!16s16sHH")

_COMMANDS = (Command.LOCAL, Command.PROXY)
_FAMILIES = {k: (Family(k >> 4), Transport(k & 0xF)) for k in ADDRESS_SIZES}
_PROXY_CMD = Command.PROXY
_F_INET = Family.INET
_F_INET6 = Family.INET6
_T_STREAM = Transport.STREAM


_V6_TEXT: dict[bytes, str] = {}
"""Packed IPv6 address -> its text, for the addresses seen last (a balancer's own addresses,
returning clients). ``inet_ntop`` of an IPv6 address costs about as much as the rest of a v2
TCP6 parse; a look-up costs a tenth. Bounded: emptied when it reaches ``V6_TEXT_MAX``."""
V6_TEXT_MAX = 1024
_v6_cached = _V6_TEXT.get


def ipv6_text(packed: bytes) -> str:
    """Canonical IPv6 text: ``ipaddress``'s compressed form (RFC 5952)."""
    return _v6_cached(packed) or _v6_new(packed)


def _v6_new(packed: bytes) -> str:
    """``ipv6_text`` for an address not in the cache (and now in it)."""
    text = packed.hex(":", 2)  # eight 4-digit groups, in a fifth of inet_ntop's time
    if "0000" in text or text[0] == "0":
        # A zero group (RFC 5952 compresses the longest run; v4-mapped and v4-compatible
        # addresses have them) or a leading-zero first group (only ::/8 has one): the
        # general way. inet_ntop writes v4-mapped/compatible as dotted quads; ipaddress not.
        text = inet_ntop(AF_INET6, packed)
        if "." in text:
            text = ipaddress.IPv6Address(packed).compressed
    elif ":0" in text:
        # No zero group, so nothing to compress: only each group's leading zeros go.
        if ":00" in text:
            text = text.replace(":000", ":").replace(":00", ":")
        text = text.replace(":0", ":")
    if len(_V6_TEXT) >= V6_TEXT_MAX:
        _V6_TEXT.clear()
    _V6_TEXT[packed] = text
    return text


def check_prefix(data: bytes | bytearray, max_size: int) -> int | None:
    """Validate what is present of the 16-byte fixed part; the total length once known.

    Assumes the 12-byte signature already matched. Raises InvalidHeader as soon as a present
    byte is wrong, so a reader rejects a bad header without waiting for the rest.
    """
    n = len(data)
    if n > 12:
        vc = data[12]
        if vc >> 4 != 2:
            raise InvalidHeader(Reason.BAD_VERSION, f"version nibble is {vc >> 4}, must be 2")
        if vc & 0xF > 1:
            raise InvalidHeader(
                Reason.BAD_COMMAND, f"command is 0x{vc & 0xF:X}, must be LOCAL (0) or PROXY (1)"
            )
        if n > 13 and data[13] not in ADDRESS_SIZES:
            raise InvalidHeader(
                Reason.BAD_FAMILY,
                f"family/transport byte is 0x{data[13]:02X}; valid: 00 11 12 21 22 31 32",
            )
    if n < FIXED:
        return None
    total = FIXED + ((data[14] << 8) | data[15])
    if total > max_size:
        raise InvalidHeader(
            Reason.TOO_LONG, f"v2 header is {total} bytes, larger than the {max_size} allowed"
        )
    return total


def parse_v2(data: bytes, options: ParseOptions) -> tuple[ProxyHeader, int]:
    """The v2 header at the start of ``data`` (whose first 12 bytes are the signature)."""
    # Fast paths for what balancers send most: PROXY over TCP4/TCP6, with or without TLVs.
    # Those fixed parts are valid by construction, so only the size bound and the length remain
    # to check; anything unusual takes the general path below.
    if len(data) >= FIXED and data[12] == 0x21:
        fam = data[13]
        if fam == 0x11:
            size = FIXED + ((data[14] << 8) | data[15])
            if 28 <= size <= options.max_v2_size and len(data) >= size:
                # TLVs: checked now, decoded on first access (ProxyHeader.tlvs)
                block = check_tlvs(data, 28, size, options.max_tlvs) if size > 28 else ()
                a, b, c, d, e, f, g, h, sp, dp = _INET_BYTES.unpack_from(data, FIXED)
                t = _DEC
                return make_header(
                    2,
                    _PROXY_CMD,
                    _F_INET,
                    _T_STREAM,
                    (f"{t[a]}.{t[b]}.{t[c]}.{t[d]}", sp),
                    (f"{t[e]}.{t[f]}.{t[g]}.{t[h]}", dp),
                    block,
                ), size
        elif fam == 0x21:
            if data[15] == 36 and data[14] == 0 and len(data) >= 52 and options.max_v2_size >= 52:
                # no TLVs, the usual TCP6 header: not one step more than needed
                s, d, sp, dp = _INET6.unpack_from(data, FIXED)
                src = _v6_cached(s) or _v6_new(s)
                dst = _v6_cached(d) or _v6_new(d)
                return make_header(2, _PROXY_CMD, _F_INET6, _T_STREAM, (src, sp), (dst, dp)), 52
            size = FIXED + ((data[14] << 8) | data[15])
            if 52 <= size <= options.max_v2_size and len(data) >= size:
                block = check_tlvs(data, 52, size, options.max_tlvs) if size > 52 else ()
                s, d, sp, dp = _INET6.unpack_from(data, FIXED)
                src = _v6_cached(s) or _v6_new(s)
                dst = _v6_cached(d) or _v6_new(d)
                return make_header(
                    2, _PROXY_CMD, _F_INET6, _T_STREAM, (src, sp), (dst, dp), block
                ), size
    total = check_prefix(data, options.max_v2_size)
    if total is None or len(data) < total:
        raise IncompleteHeader(f"v2 header needs {total or FIXED} bytes, have {len(data)}")
    fam = data[13]
    addr_len = ADDRESS_SIZES[fam]
    command = _COMMANDS[data[12] & 1]
    family, transport = _FAMILIES[fam]
    start = FIXED + addr_len
    if command is not _PROXY_CMD:
        # LOCAL: the addresses are ignored (a short or dummy block carries nothing to use).
        local = local_tlvs(data, start, total, options.max_tlvs) if start < total else ()
        return make_header(2, command, family, transport, None, None, local), total
    if start > total:
        raise InvalidHeader(
            Reason.BAD_ADDRESS,
            f"address block is {total - FIXED} bytes, family 0x{fam:02X} needs {addr_len}",
        )
    tlvs = check_tlvs(data, start, total, options.max_tlvs) if start < total else ()
    if family is Family.INET:
        s, d, sp, dp = _INET.unpack_from(data, FIXED)
        return make_header(
            2,
            command,
            family,
            transport,
            (inet_ntop(AF_INET, s), sp),
            (inet_ntop(AF_INET, d), dp),
            tlvs,
        ), total
    if family is Family.INET6:
        s, d, sp, dp = _INET6.unpack_from(data, FIXED)
        return make_header(
            2, command, family, transport, (ipv6_text(s), sp), (ipv6_text(d), dp), tlvs
        ), total
    if family is Family.UNIX:
        src = unix_path(data[FIXED : FIXED + 108])
        dst = unix_path(data[FIXED + 108 : FIXED + 216])
        return make_header(2, command, family, transport, src, dst, tlvs), total
    return make_header(2, command, family, transport, None, None, tlvs), total


def local_tlvs(data: bytes, start: int, end: int, max_tlvs: int) -> bytes | tuple[()]:
    """The TLVs after a LOCAL header's address block, or none if those bytes are not TLVs.

    The spec (2.2) says a receiver must accept LOCAL and discard its protocol block, and for
    AF_UNSPEC ignore any address information: senders put dummy address blocks or padding
    there. So bytes that do not parse as TLVs are dropped rather than rejected. TLVs that do
    parse keep their CRC32C check: a checksum that does not match is still refused.
    """
    try:
        return check_tlvs(data, start, end, max_tlvs)
    except InvalidHeader as err:
        if err.reason is Reason.CRC_MISMATCH:
            raise
        return ()


def unix_path(raw: bytes) -> str:
    """A 108-byte sun_path as text; abstract names keep their leading NUL."""
    if raw[:1] == b"\0":
        name = raw[1:].rstrip(b"\0")
        return "\0" + name.decode("utf-8", "surrogateescape") if name else ""
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
