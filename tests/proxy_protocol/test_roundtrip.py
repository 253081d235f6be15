"""Property tests: parse(encode(h)) == h for every version, family, command and TLV list."""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from l4lb.proxy_protocol import (
    TLV,
    Command,
    Family,
    HeaderReader,
    ParseOptions,
    ProxyHeader,
    TLVType,
    Transport,
    build,
    encode,
    parse,
)
from l4lb.proxy_protocol.checksum import crc32c_python

from .strategies import headers, ipv4, ipv6, ports, tlv_lists, v2_headers

BIG = ParseOptions(max_v2_size=65551, max_tlvs=4096)


@settings(max_examples=300)
@given(header=headers, payload=st.binary(max_size=32))
def test_parse_encode_roundtrip(header: ProxyHeader, payload: bytes) -> None:
    wire = encode(header)
    assert parse(wire + payload, BIG) == (header, len(wire))


@settings(max_examples=150)
@given(header=headers, payload=st.binary(max_size=16), cuts=st.lists(st.integers(0, 600)))
def test_reader_roundtrip_with_random_splits(
    header: ProxyHeader, payload: bytes, cuts: list[int]
) -> None:
    data = encode(header) + payload
    points = sorted({c for c in cuts if c < len(data)} | {0, len(data)})
    reader = HeaderReader(BIG)
    for a, b in itertools.pairwise(points):
        reader.feed(data[a:b])
    assert reader.header == header
    assert reader.trailing == payload


@settings(max_examples=150)
@given(header=v2_headers())
def test_crc32c_roundtrip(header: ProxyHeader) -> None:
    wire = encode(header, crc32c=True)
    parsed, n = parse(wire, BIG)
    assert n == len(wire)
    crc_tlv = parsed.tlvs[-1]
    assert crc_tlv.type == TLVType.CRC32C
    assert parsed == replace(header, tlvs=(*header.tlvs, crc_tlv))
    zeroed = wire[:-4] + b"\0\0\0\0"
    assert parsed.crc32c == crc32c_python(zeroed)
    # Re-encoding a parsed header keeps a correct checksum (it is recomputed, not copied).
    assert parse(encode(parsed), BIG)[0] == parsed


@settings(max_examples=200)
@given(
    src=st.one_of(ipv4, ipv6),
    dst=st.one_of(ipv4, ipv6),
    sport=ports,
    dport=ports,
    version=st.sampled_from([1, 2]),
    tlvs=tlv_lists,
    crc=st.booleans(),
)
def test_build_matches_socket_addresses(
    src: str, dst: str, sport: int, dport: int, version: int, tlvs: tuple[TLV, ...], crc: bool
) -> None:
    if version == 1:
        tlvs, crc = (), False
    wire = build(version, (src, sport), (dst, dport), tlvs=tlvs, crc32c=crc)
    header, n = parse(wire, BIG)
    assert n == len(wire)
    assert header.version == version and header.command is Command.PROXY
    assert header.transport is Transport.STREAM
    both_v4 = ":" not in src and ":" not in dst
    assert header.family is (Family.INET if both_v4 else Family.INET6)

    def expect(host: str) -> str:
        if both_v4:
            return host
        a = ipaddress.ip_address(host)
        if a.version == 4:
            a = ipaddress.IPv6Address("::ffff:" + host)
        return ipaddress.IPv6Address(int(a)).compressed

    assert header.source == (expect(src), sport)
    assert header.destination == (expect(dst), dport)
    body_tlvs = header.tlvs[:-1] if crc else header.tlvs
    assert body_tlvs == tlvs
    if crc:
        assert header.tlvs[-1].type == TLVType.CRC32C
