"""TLV records of v2 headers: bounds-checked parsing, the SSL sub-TLVs, CRC32C, and encoding."""

from __future__ import annotations

import struct
from collections.abc import Iterable

from l4lb.proxy_protocol import checksum
from l4lb.proxy_protocol.errors import InvalidHeader, Reason
from l4lb.proxy_protocol.model import TLV, SSLInfo, TLVType

_TL = struct.Struct("!BH")
_SSL_HEAD = struct.Struct("!BI")

MAX_UNIQUE_ID = 128
_T_CRC32C = int(TLVType.CRC32C)
_T_UNIQUE_ID = int(TLVType.UNIQUE_ID)
_T_SSL = int(TLVType.SSL)
_SPECIAL = frozenset((_T_CRC32C, _T_UNIQUE_ID, _T_SSL))
_tuple_new = tuple.__new__

TLVLike = TLV | tuple[int, bytes]


def parse_ssl(value: bytes) -> SSLInfo:
    """The PP2_TYPE_SSL value: 1-byte client bits, 4-byte verify, then bounds-checked sub-TLVs."""
    n = len(value)
    if n < 5:
        raise InvalidHeader(Reason.BAD_SSL_TLV, f"SSL TLV is {n} bytes, needs at least 5")
    client, verify = _SSL_HEAD.unpack_from(value, 0)
    subs: list[TLV] = []
    pos = 5
    while pos < n:
        if pos + 3 > n:
            raise InvalidHeader(
                Reason.BAD_SSL_TLV, f"SSL sub-TLV header at offset {pos} runs past the SSL TLV"
            )
        t, length = _TL.unpack_from(value, pos)
        pos += 3
        if pos + length > n:
            raise InvalidHeader(
                Reason.BAD_SSL_TLV,
                f"SSL sub-TLV 0x{t:02X} of {length} bytes runs past the SSL TLV ({n} bytes)",
            )
        subs.append(TLV(t, value[pos : pos + length]))
        pos += length
    return SSLInfo(client, verify, tuple(subs))


def parse_tlvs(data: bytes, start: int, end: int, max_tlvs: int) -> tuple[TLV, ...]:
    """The TLVs in ``data[start:end]`` (``end`` is the header's end), checked and verified.

    Every record must fit and the last must end exactly at ``end``. A CRC32C TLV is verified
    over ``data[:end]`` with its value zeroed (spec 2.2.3). This loop is the codec's hottest
    code for TLV-carrying headers: checks of the rare types are kept out of its way.
    """
    tlvs: list[TLV] = []
    append = tlvs.append
    new = _tuple_new
    special = _SPECIAL
    crc_at = -1
    pos = start
    last = end - 3
    while pos < end:
        if pos > last:
            raise InvalidHeader(
                Reason.TLV_OVERFLOW,
                f"{end - pos} stray byte(s) at offset {pos}: a TLV needs at least 3",
            )
        t = data[pos]
        vstart = pos + 3
        pos = vstart + ((data[pos + 1] << 8) | data[pos + 2])
        if pos > end:
            raise InvalidHeader(
                Reason.TLV_OVERFLOW,
                f"TLV 0x{t:02X} at offset {vstart - 3} declares {pos - vstart} bytes, "
                f"only {end - vstart} left in the header",
            )
        value = data[vstart:pos]
        if t in special:
            if t == _T_CRC32C:
                if crc_at >= 0 or pos - vstart != 4:
                    raise InvalidHeader(
                        Reason.BAD_TLV,
                        "more than one CRC32C TLV"
                        if crc_at >= 0
                        else f"CRC32C TLV is {pos - vstart} bytes, must be 4",
                    )
                crc_at = vstart
            elif t == _T_UNIQUE_ID:
                if pos - vstart > MAX_UNIQUE_ID:
                    raise InvalidHeader(
                        Reason.UNIQUE_ID_TOO_LONG,
                        f"UNIQUE_ID is {pos - vstart} bytes, at most {MAX_UNIQUE_ID}",
                    )
            else:
                parse_ssl(value)
        append(new(TLV, (t, value)))
    if len(tlvs) > max_tlvs:
        raise InvalidHeader(Reason.TLV_TOO_MANY, f"{len(tlvs)} TLVs, more than {max_tlvs}")
    if crc_at >= 0:
        verify_crc(data, crc_at, end)
    return tuple(tlvs)


def verify_crc(data: bytes, crc_at: int, end: int) -> None:
    """Check the CRC32C stored at ``data[crc_at:crc_at+4]`` against ``data[:end]``."""
    expected = data[crc_at : crc_at + 4]
    actual = checksum.crc32c_bytes(data[:crc_at] + b"\0\0\0\0" + data[crc_at + 4 : end])
    if actual != int.from_bytes(expected, "big"):
        raise InvalidHeader(
            Reason.CRC_MISMATCH,
            f"CRC32C is 0x{expected.hex()} in the header but 0x{actual:08x} computed",
        )


def encode_tlvs(tlvs: Iterable[TLVLike]) -> bytes:
    """The wire form of ``tlvs`` (TLV records or ``(type, value)`` pairs)."""
    out = bytearray()
    for item in tlvs:
        try:
            t, value = item
        except (TypeError, ValueError) as err:
            raise InvalidHeader(
                Reason.UNENCODABLE, f"{item!r} is not a TLV or a (type, value) pair"
            ) from err
        if type(value) is not bytes:
            if not isinstance(value, bytes | bytearray | memoryview):
                raise InvalidHeader(
                    Reason.UNENCODABLE, f"TLV value must be bytes, not {type(value).__name__}"
                )
            value = bytes(value)
        if not (isinstance(t, int) and 0 <= t <= 0xFF):
            raise InvalidHeader(Reason.UNENCODABLE, f"TLV type {t!r} is not a byte")
        if len(value) > 0xFFFF:
            raise InvalidHeader(Reason.UNENCODABLE, f"TLV 0x{t:02X} value exceeds 65535 bytes")
        if t in _SPECIAL:  # never write what parse_tlvs refuses
            if t == _T_SSL:
                parse_ssl(value)
            elif t == _T_UNIQUE_ID and len(value) > MAX_UNIQUE_ID:
                raise InvalidHeader(
                    Reason.UNENCODABLE, f"UNIQUE_ID is {len(value)} bytes, at most {MAX_UNIQUE_ID}"
                )
        out += _TL.pack(t, len(value))
        out += value
    return bytes(out)
