"""The codec at its bounds: the largest v2 header, the longest v1 line, SSL TLVs nested inside
SSL TLVs, and many TLVs; each fed whole and through the incremental reader."""

from __future__ import annotations

import struct

import pytest

from l4lb.proxy_protocol import (
    HeaderReader,
    InvalidHeader,
    ParseOptions,
    Reason,
    parse,
)
from l4lb.proxy_protocol.options import V2_MAX_POSSIBLE

from .vectors import TCP4_BLOCK, tlv, v2

WIDE = ParseOptions(max_v2_size=V2_MAX_POSSIBLE, max_tlvs=100_000)


def _padded(total: int, cmd: int = 0x21) -> bytes:
    """A TCP4 header of exactly ``total`` bytes: the address block, then one NOOP TLV."""
    pad = total - 16 - 12 - 3
    return v2(cmd, 0x11, TCP4_BLOCK + tlv(0x04, bytes(pad)))


@pytest.mark.parametrize("cmd", [0x20, 0x21])
def test_v2_length_field_at_its_maximum(cmd: int) -> None:
    data = _padded(V2_MAX_POSSIBLE, cmd)
    assert data[14:16] == b"\xff\xff" and len(data) == 65551
    header, n = parse(data + b"after", WIDE)
    assert n == 65551 and header.tlvs[0].value == bytes(65551 - 31)
    reader = HeaderReader(WIDE)
    for i in range(0, len(data), 4093):
        reader.feed(data[i : i + 4093])
    assert reader.header == header and reader.consumed == 65551


def test_v2_default_bound_is_exact() -> None:
    assert parse(_padded(4096))[1] == 4096
    with pytest.raises(InvalidHeader) as info:
        parse(_padded(4097))
    assert info.value.reason is Reason.TOO_LONG
    reader = HeaderReader()  # refused from the 16-byte fixed part, before the body arrives
    with pytest.raises(InvalidHeader):
        reader.feed(_padded(4097)[:16])


def test_v1_at_exactly_107_bytes_and_one_more() -> None:
    v6 = ":".join(["ffff"] * 8)
    line = f"PROXY UNKNOWN {v6} {v6} 65535 65535\r\n".encode()
    assert len(line) == 107
    assert parse(line)[1] == 107
    longer = line[:-2] + b"5\r\n"
    with pytest.raises(InvalidHeader) as info:
        parse(longer)
    assert info.value.reason is Reason.TOO_LONG
    reader = HeaderReader()
    with pytest.raises(InvalidHeader):
        for b in longer:
            reader.feed(bytes([b]))


def _ssl(*subs: bytes) -> bytes:
    return struct.pack("!BI", 0x01, 0) + b"".join(subs)


@pytest.mark.parametrize(
    "value",
    [
        _ssl(tlv(0x20, _ssl(tlv(0x21, b"TLSv1.3")))),  # an SSL TLV inside the SSL TLV
        _ssl(tlv(0x20, b"\xff" * 3)),  # ... whose own content is not an SSL TLV
        _ssl(tlv(0x03, b"\0\0\0\0")),  # a CRC32C type as a sub-TLV: opaque, not verified
        _ssl(*[tlv(0x21, b"")] * 500),  # many empty sub-TLVs
    ],
)
def test_ssl_sub_tlvs_are_opaque_and_bounded(value: bytes) -> None:
    data = v2(0x21, 0x11, TCP4_BLOCK + tlv(0x20, value))
    header, _ = parse(data, WIDE)
    assert header.ssl is not None and header.ssl.client == 1


def test_ssl_sub_tlv_overflowing_the_outer_one_is_refused() -> None:
    inner = _ssl(tlv(0x20, _ssl(tlv(0x21, b"TLSv1.3"))))
    bad = inner[:-1]  # the nested record now runs past the outer SSL TLV
    with pytest.raises(InvalidHeader) as info:
        parse(v2(0x21, 0x11, TCP4_BLOCK + tlv(0x20, bad) + b"\x04\x00\x00"))
    assert info.value.reason in (Reason.BAD_SSL_TLV, Reason.TLV_OVERFLOW)


def test_many_empty_tlvs_up_to_the_largest_header() -> None:
    count = (V2_MAX_POSSIBLE - 16 - 12) // 3
    data = v2(0x21, 0x11, TCP4_BLOCK + tlv(0x04, b"") * count)
    header, _ = parse(data, WIDE)
    assert len(header.tlvs) == count
    with pytest.raises(InvalidHeader) as info:
        parse(data, ParseOptions(max_v2_size=V2_MAX_POSSIBLE))
    assert info.value.reason is Reason.TLV_TOO_MANY
