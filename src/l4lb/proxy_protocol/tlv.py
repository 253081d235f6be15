"""TLV records of v2 headers: bounds-checked parsing, the SSL sub-TLVs, CRC32C, and encoding."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any, Final

from l4lb.proxy_protocol import checksum
from l4lb.proxy_protocol.errors import InvalidHeader, Reason
from l4lb.proxy_protocol.model import TLV, SSLInfo, TLVType, decode_tlv_block

_TL = struct.Struct("!BH")
_SSL_HEAD = struct.Struct("!BI")
_U32 = struct.Struct("!I")
_ZERO4 = bytes(4)

MAX_UNIQUE_ID: Final = 128
_T_CRC32C: Final = int(TLVType.CRC32C)
_T_UNIQUE_ID: Final = int(TLVType.UNIQUE_ID)
_T_SSL: Final = int(TLVType.SSL)
_SPECIAL: Final = frozenset((_T_CRC32C, _T_UNIQUE_ID, _T_SSL))
_CHECKED: Final = bytes(1 if t in _SPECIAL else 0 for t in range(256))
"""Non-zero for the TLV types parsing must look into: one byte look-up per record."""

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
    """The TLVs in ``data[start:end]`` (``end`` is the header's end), checked and verified."""
    return decode_tlv_block(check_tlvs(data, start, end, max_tlvs))


def check_tlvs(data: bytes, start: int, end: int, max_tlvs: int) -> bytes:
    """``data[start:end]`` once its TLVs are checked (``end`` is the header's end).

    The records are not built here: the parsers keep the block and
    :func:`~l4lb.proxy_protocol.model.decode_tlv_block` builds them on first access. Every
    record must fit and the last must end exactly at ``end``; a CRC32C TLV is verified over
    ``data[:end]`` with its value zeroed (spec 2.2.3). This loop is the codec's hottest code for
    TLV-carrying headers, so it does the least per record (bytes indexing, which a compiled
    build turns into plain C): a record running past the block ends the loop (checked once
    after it) or cuts its own header short (IndexError: a 1- or 2-byte stray tail), and the
    rare types are checked out of its way.
    """
    block = data[start:end]
    size = end - start
    checked = _CHECKED
    crc_at = -1
    pos = t = n = 0
    try:
        while pos < size:
            t = block[pos]
            n = (block[pos + 1] << 8) | block[pos + 2]
            pos += 3 + n
            if checked[t]:
                if pos > size:
                    break  # reported below, as any record running past the header
                if t == _T_CRC32C:
                    if crc_at >= 0 or n != 4:
                        raise InvalidHeader(
                            Reason.BAD_TLV,
                            "more than one CRC32C TLV"
                            if crc_at >= 0
                            else f"CRC32C TLV is {n} bytes, must be 4",
                        )
                    crc_at = start + pos - 4
                elif t == _T_UNIQUE_ID:
                    if n > MAX_UNIQUE_ID:
                        raise InvalidHeader(
                            Reason.UNIQUE_ID_TOO_LONG,
                            f"UNIQUE_ID is {n} bytes, at most {MAX_UNIQUE_ID}",
                        )
                else:
                    parse_ssl(block[pos - n : pos])
    except IndexError:  # a record header cut short: 1 or 2 stray bytes at the end
        raise InvalidHeader(
            Reason.TLV_OVERFLOW,
            f"{size - pos} stray byte(s) at offset {start + pos}: a TLV needs at least 3",
        ) from None
    if pos > size:
        vstart = pos - n
        raise InvalidHeader(
            Reason.TLV_OVERFLOW,
            f"TLV 0x{t:02X} at offset {start + vstart - 3} declares {n} bytes, "
            f"only {size - vstart} left in the header",
        )
    if size > 3 * max_tlvs:  # below that, even empty records cannot exceed the limit
        count = 0
        pos = 0
        while pos < size:
            pos += 3 + ((block[pos + 1] << 8) | block[pos + 2])
            count += 1
        if count > max_tlvs:
            raise InvalidHeader(Reason.TLV_TOO_MANY, f"{count} TLVs, more than {max_tlvs}")
    if crc_at >= 0:
        expected = _U32.unpack_from(data, crc_at)[0]
        actual = checksum.crc32c_bytes(data[:crc_at] + _ZERO4 + data[crc_at + 4 : end])
        if actual != expected:
            raise InvalidHeader(
                Reason.CRC_MISMATCH,
                f"CRC32C is 0x{expected:08x} in the header but 0x{actual:08x} computed",
            )
    return block


def encode_tlvs(tlvs: Iterable[TLVLike]) -> bytes:
    """The wire form of ``tlvs`` (TLV records or ``(type, value)`` pairs)."""
    out = bytearray()
    # Any, not TLVLike: a compiled build (make compile) would type-check each item itself and
    # raise TypeError where the checks below raise the project's error
    items: Iterable[Any] = tlvs
    for item in items:
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
