"""Fuzz invariant (h11's): random or mutated bytes give a header or a ProxyProtocolError, never
anything else, and the incremental reader agrees with the one-shot parser."""

from __future__ import annotations

import contextlib
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l4lb.proxy_protocol import (
    TLV,
    Command,
    Family,
    HeaderReader,
    IncompleteHeader,
    ParseOptions,
    ProxyHeader,
    ProxyProtocolError,
    Transport,
    encode,
    parse,
    sniff,
    v1_line_length,
)

from .strategies import headers
from .vectors import INVALID, SIG, VALID

SEEDS = [v.data for v in VALID] + [v.data for v in INVALID]
OPTION_SETS = [
    ParseOptions(),
    ParseOptions(allow_ipv4_in_tcp6=True, allow_v1_unknown_long=False, max_tlvs=3),
    ParseOptions(max_v2_size=65551, max_tlvs=0),
]


def outcome(data: bytes, options: ParseOptions) -> tuple[str, object]:
    try:
        header, n = parse(data, options)
    except ProxyProtocolError as err:
        return ("error", err.reason)
    assert isinstance(header, ProxyHeader)
    assert 0 < n <= len(data)
    return ("ok", (header, n))


def reader_outcome(data: bytes, options: ParseOptions, chunk: int) -> tuple[str, object]:
    reader = HeaderReader(options)
    try:
        for i in range(0, max(len(data), 1), chunk):
            reader.feed(data[i : i + chunk])
    except ProxyProtocolError as err:
        return ("error", err.reason)
    if reader.header is None:
        return ("error", IncompleteHeader().reason)
    assert reader.trailing == data[reader.consumed :]
    return ("ok", (reader.header, reader.consumed))


def check(data: bytes, options: ParseOptions, chunk: int) -> None:
    start = time.monotonic()
    whole = outcome(data, options)
    assert reader_outcome(data, options, chunk) == whole
    s = sniff(data)
    assert s in (None, 0, 1, 2)
    if whole[0] == "ok":
        assert s in (1, 2)
    if data[:5] == b"PROXY":
        with contextlib.suppress(ProxyProtocolError):
            v1_line_length(data)
    assert time.monotonic() - start < 2.0  # bounded: no pathological slowness, no hang


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "extend"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0, 0x0A, 0x0D, 0x20, 0x30, 0x39, 0x3A, 0xFF]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and data:
            del data[pos]
        elif op == "truncate":
            del data[pos:]
        elif op == "extend":
            data += draw(st.binary(max_size=8))
    return bytes(data)


random_bytes = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: SIG + b),
    st.binary(max_size=120).map(lambda b: b"PROXY " + b),
    st.text(alphabet="PROXYTCP46UNKW0123456789.:abcdef \r\n", max_size=120).map(str.encode),
)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(data=random_bytes, options=st.sampled_from(OPTION_SETS), chunk=st.integers(1, 64))
def test_random_bytes(data: bytes, options: ParseOptions, chunk: int) -> None:
    check(data, options, chunk)


@settings(max_examples=800, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated(), options=st.sampled_from(OPTION_SETS), chunk=st.integers(1, 64))
def test_mutated_vectors(data: bytes, options: ParseOptions, chunk: int) -> None:
    check(data, options, chunk)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=headers, flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=3)
)
def test_mutated_encodings(header: ProxyHeader, flips: list[tuple[int, int]]) -> None:
    data = bytearray(encode(header, crc32c=header.version == 2))
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    check(bytes(data), ParseOptions(max_v2_size=65551), 7)


def test_crc_catches_every_single_byte_change() -> None:
    """With a CRC32C TLV, changing any one byte of a v2 header is always rejected (except the
    CRC TLV's own type/length bytes: changing those removes the checksum, which the spec allows)."""
    from l4lb.proxy_protocol import build

    wire = build(
        2, ("192.0.2.1", 1234), ("198.51.100.2", 443), tlvs=[(2, b"a.example")], crc32c=True
    )
    crc_tlv_at = len(wire) - 7
    for i in range(len(wire)):
        if crc_tlv_at <= i < crc_tlv_at + 3:
            continue
        for delta in (1, 0x80):
            bad = bytearray(wire)
            bad[i] ^= delta
            try:
                parse(bytes(bad))
            except ProxyProtocolError:
                continue
            raise AssertionError(f"byte {i} ^ {delta:#x} was accepted")


hosts = st.one_of(
    st.text(max_size=45),
    st.ip_addresses().map(str),
    st.sampled_from(
        ["", "::", "0.0.0.0", "fe80::1%eth0", "1.2.3.4\0", "::ffff:1.2.3.4", "a" * 300]
    ),
)
port_values = st.one_of(st.integers(-(2**40), 2**40), st.sampled_from([0, 65535, 65536, -1]))


@settings(max_examples=400)
@given(
    version=st.sampled_from([0, 1, 2, 3]),
    src=st.tuples(hosts, port_values),
    dst=st.tuples(hosts, port_values),
    tlvs=st.lists(st.tuples(st.integers(-1, 300), st.binary(max_size=8)), max_size=3),
    crc=st.booleans(),
)
def test_build_returns_bytes_or_project_error(
    version: int,
    src: tuple[str, int],
    dst: tuple[str, int],
    tlvs: list[tuple[int, bytes]],
    crc: bool,
) -> None:
    from l4lb.proxy_protocol import build

    try:
        wire = build(version, src, dst, tlvs=tlvs, crc32c=crc)
    except ProxyProtocolError:
        return
    header, n = parse(wire, ParseOptions(max_v2_size=65551))
    assert n == len(wire) and header.version == version


junk = st.one_of(
    st.none(),
    st.integers(-5, 70000),
    st.text(max_size=10),
    st.tuples(st.text(max_size=10), st.integers(-5, 70000)),
    st.tuples(st.ip_addresses().map(str), st.integers(0, 65535)),
)


@settings(max_examples=400)
@given(
    version=st.sampled_from([1, 2, 7]),
    command=st.sampled_from(list(Command)),
    family=st.sampled_from(list(Family)),
    transport=st.sampled_from(list(Transport)),
    src=junk,
    dst=junk,
    tlvs=st.lists(st.builds(TLV, st.integers(0, 255), st.binary(max_size=8)), max_size=3),
    crc=st.booleans(),
)
def test_encode_returns_bytes_or_project_error(
    version: int,
    command: Command,
    family: Family,
    transport: Transport,
    src: object,
    dst: object,
    tlvs: list[TLV],
    crc: bool,
) -> None:
    header = ProxyHeader(version, command, family, transport, src, dst, tuple(tlvs))  # type: ignore[arg-type]
    try:
        wire = encode(header, crc32c=crc)
    except ProxyProtocolError:
        return
    # Whatever encode accepts, parse must read back (maybe canonicalised, never an exception
    # other than ours: SSL/CRC/UNIQUE_ID TLVs with junk values may be rejected).
    try:
        parse(wire, ParseOptions(max_v2_size=65551))
    except ProxyProtocolError as err:
        assert err.reason.value in {"bad_ssl_tlv", "unique_id_too_long", "bad_tlv"}, err


def test_reader_accepts_bytearray_and_memoryview_chunks() -> None:
    wire = VALID[0].data + b"tail"
    reader = HeaderReader()
    reader.feed(bytearray(wire[:10]))
    reader.feed(memoryview(wire)[10:20])
    assert reader.feed(memoryview(bytearray(wire[20:]))) == VALID[0].header
    assert reader.trailing == b"tail"


@pytest.mark.parametrize(
    "tlv",
    [
        (0x20, b""),  # SSL TLV shorter than its 5-byte head
        (0x20, bytes(6)),  # a sub-TLV header cut short
        (0x20, bytes(7) + b"\x01"),  # a sub-TLV longer than the SSL TLV
        (0x05, bytes(129)),  # UNIQUE_ID over 128 bytes
    ],
)
def test_build_refuses_a_tlv_that_parse_would_refuse(tlv: tuple[int, bytes]) -> None:
    """Found by test_build_returns_bytes_or_project_error: build wrote SSL TLVs that parse then
    rejected (a header l4lb sent would have been refused by its own backends)."""
    from l4lb.proxy_protocol import build

    with pytest.raises(ProxyProtocolError):
        build(2, ("192.0.2.1", 1), ("198.51.100.2", 2), tlvs=[tlv])
