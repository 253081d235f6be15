"""The parsers' fast paths and their text caches agree with the strict paths on any input.

The v1 fast path (one split, validated fields, cached IPv4 text) and the v2 address caches
(packed -> text) must give exactly what the strict path gives: the same header for a valid
line, the same error Reason for an invalid one, whether the cache is cold or warm, and the
caches stay bounded and only ever hold validated addresses.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from l4lb.proxy_protocol import InvalidHeader, ParseOptions, ProxyProtocolError, parse
from l4lb.proxy_protocol import v1 as v1_mod
from l4lb.proxy_protocol import v2 as v2_mod
from l4lb.proxy_protocol.v1 import parse_line, scan

OPTIONS = [ParseOptions(), ParseOptions(allow_ipv4_in_tcp6=True, allow_v1_unknown_long=False)]

_octet = st.one_of(
    st.integers(0, 255).map(str),
    st.sampled_from(["00", "01", "256", "999", "-1", "+1", "1 ", "", "0x1", "１"]),
)
_v4ish = st.one_of(
    st.tuples(_octet, _octet, _octet, _octet).map(".".join),
    st.lists(_octet, min_size=1, max_size=6).map(".".join),
)
_v6ish = st.one_of(
    st.binary(min_size=16, max_size=16).map(lambda b: str(ipaddress.IPv6Address(b))),
    st.binary(min_size=16, max_size=16).map(lambda b: ipaddress.IPv6Address(b).exploded),
    st.sampled_from(["::1%eth0", "::ffff:192.0.2.1", "1::2::3", "2001:DB8::1", ":::", "::"]),
    _v4ish,
)
_port = st.one_of(
    st.integers(0, 65535).map(str),
    st.sampled_from(["65536", "99999", "00", "01", "", "-1", "+80", "１", "123456", " 1"]),
)


@st.composite
def v1_lines(draw: st.DrawFn) -> bytes:
    proto = draw(st.sampled_from(["TCP4", "TCP6", "TCP4", "TCP6", "UNKNOWN", "tcp4", "UDP4"]))
    addr = _v4ish if proto == "TCP4" else _v6ish
    fields = [proto, draw(addr), draw(addr), draw(_port), draw(_port)]
    sep = draw(st.sampled_from([" ", " ", " ", "  ", "\t"]))
    text = "PROXY " + sep.join(fields) + "\r\n"
    return text.encode("utf-8") + draw(st.binary(max_size=4))


def outcome(fn: object, *args: object) -> tuple[str, object]:
    try:
        header = fn(*args)  # type: ignore[operator]
    except InvalidHeader as err:
        return "invalid", err.reason
    except ProxyProtocolError as err:
        return "error", type(err).__name__
    return "ok", header


def strict_v1(data: bytes, options: ParseOptions) -> tuple[object, int]:
    length = scan(data)
    assert length is not None
    return parse_line(data, options, length - 2), length


@settings(max_examples=600, deadline=None)
@given(v1_lines(), st.sampled_from(OPTIONS))
def test_v1_fast_path_agrees_with_strict_path_cold_and_warm(
    data: bytes, options: ParseOptions
) -> None:
    v1_mod._V4_TEXT.clear()
    strict = outcome(strict_v1, data, options)
    assert outcome(parse, data, options) == strict  # cold cache
    assert outcome(parse, data, options) == strict  # warm: the fields may now be cached
    for raw, text in v1_mod._V4_TEXT.items():  # only addresses the strict check accepts
        assert str(ipaddress.IPv4Address(text)) == text == raw.decode()


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=16, max_size=16), st.binary(min_size=4, max_size=4))
def test_address_text_caches_give_ipaddress_text_cold_and_warm(p6: bytes, p4: bytes) -> None:
    v2_mod._V6_TEXT.clear()
    for _ in range(2):
        assert v2_mod.ipv6_text(p6) == ipaddress.IPv6Address(p6).compressed
    wire6 = v2_mod.SIGNATURE + b"\x21\x21\x00\x24" + p6 + p6[::-1] + struct.pack("!HH", 1, 2)
    wire4 = v2_mod.SIGNATURE + b"\x21\x11\x00\x0c" + p4 + p4[::-1] + struct.pack("!HH", 1, 2)
    for _ in range(2):
        h6, _n = parse(wire6)
        assert h6.source == (ipaddress.IPv6Address(p6).compressed, 1)
        assert h6.destination == (ipaddress.IPv6Address(p6[::-1]).compressed, 2)
        h4, _n = parse(wire4)
        assert h4.source == (str(ipaddress.IPv4Address(p4)), 1)
        assert h4.destination == (str(ipaddress.IPv4Address(p4[::-1])), 2)


def test_text_caches_stay_bounded() -> None:
    for i in range(v2_mod.V6_TEXT_MAX + 50):
        packed = struct.pack("!QQ", 0x20010DB8 << 32, i)
        assert v2_mod.ipv6_text(packed) == ipaddress.IPv6Address(packed).compressed
        assert len(v2_mod._V6_TEXT) <= v2_mod.V6_TEXT_MAX
    for i in range(v1_mod.V4_TEXT_MAX + 50):
        a, b = divmod(i, 256)
        line = f"PROXY TCP4 10.{a}.{b}.1 192.0.2.1 1000 80\r\n".encode()
        header, _n = parse(line)
        assert header.source == (f"10.{a}.{b}.1", 1000)
        assert len(v1_mod._V4_TEXT) <= v1_mod.V4_TEXT_MAX


def _inet_pton_accepts(raw: bytes) -> bool:
    try:
        socket.inet_pton(socket.AF_INET, raw.decode())
    except (OSError, ValueError):
        return False
    return True


_QUAD_EDGES = [
    b"0.0.0.0", b"255.255.255.255", b"256.0.0.0", b"1.2.3.256", b"01.2.3.4", b"1.2.3.04",
    b"1.2.3.00", b"00.1.2.3", b"1.2.3.0", b"1.2.3", b"1.2.3.4.", b".1.2.3.4", b"1..2.3",
    b"1.2.3.4.5", b"1.2.3.4 ", b" 1.2.3.4", b"1.2.3.-4", b"1.2.3.+4", b"1.2.3.4\0",
    b"1.2.3.\xd9\xa4", b"1000.2.3.4", b"192.0.2.1", b"0x1.2.3.4", b"1.2.3.999", b"",
]  # fmt: skip


@settings(max_examples=2000, deadline=None)
@given(
    st.one_of(
        st.sampled_from(_QUAD_EDGES),
        st.lists(st.sampled_from(b"0123456789."), max_size=17).map(bytes),
        st.lists(st.integers(0, 300), min_size=3, max_size=5).map(
            lambda parts: ".".join(map(str, parts)).encode()
        ),
        st.binary(max_size=16),
    )
)
def test_dotted_quad_accepts_exactly_what_inet_pton_does(raw: bytes) -> None:
    assert v1_mod.dotted_quad(raw) is _inet_pton_accepts(raw)


def test_a_rejected_v1_address_is_never_cached_and_keeps_its_reason() -> None:
    v1_mod._V4_TEXT.clear()
    for _ in range(2):
        try:
            parse(b"PROXY TCP4 192.0.2.01 192.0.2.1 1000 80\r\n")
        except InvalidHeader as err:
            assert err.reason.name == "BAD_ADDRESS"
        else:
            raise AssertionError("a leading zero was accepted")
    assert b"192.0.2.01" not in v1_mod._V4_TEXT


_group = st.one_of(
    st.integers(1, 0xFFFF),
    st.sampled_from([1, 0xF, 0x10, 0xFF, 0x100, 0xFFF, 0x1000, 0xFFFF]),
    st.integers(0, 0xFFF),  # leading zeros, and now and then a zero group
)


@settings(max_examples=600, deadline=None)
@given(st.lists(_group, min_size=8, max_size=8))
def test_ipv6_text_without_the_cache_is_ipaddress_text(groups: list[int]) -> None:
    """The text of a new address (hex groups with leading zeros dropped, or inet_ntop when a
    group is zero or the first group starts with one) is exactly ``ipaddress``'s."""
    packed = struct.pack("!8H", *groups)
    v2_mod._V6_TEXT.clear()
    assert v2_mod.ipv6_text(packed) == ipaddress.IPv6Address(packed).compressed
    assert v2_mod._V6_TEXT[packed] == ipaddress.IPv6Address(packed).compressed
