"""The public API's smaller promises: sniff, next_read_size, v1_line_length, options, build,
encode errors, and the typed accessors."""

from __future__ import annotations

import struct

import pytest

from l4lb.proxy_protocol import (
    TLV,
    Command,
    Family,
    HeaderReader,
    IncompleteHeader,
    InvalidHeader,
    ParseOptions,
    ProxyHeader,
    ProxyProtocolError,
    Reason,
    SSLInfo,
    TLVType,
    Transport,
    build,
    encode,
    local_header,
    parse,
    sniff,
    v1_line_length,
)

from .vectors import SIG, SSL_VALUE, TCP4_BLOCK, VALID, tlv, v2

BY_ID = {v.id: v for v in VALID}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", None),
        (b"P", None),
        (b"PROX", None),
        (b"PROXY", 1),
        (b"PROXY TCP4", 1),
        (b"\r", None),
        (SIG[:11], None),
        (SIG, 2),
        (SIG + b"\x21", 2),
        (b"GET / HTTP/1.1", 0),
        (b"\x16\x03\x01", 0),
        (b"PROXz", 0),
        (b"\r\n\r\n\x01", 0),
        (b"proxy", 0),
    ],
)
def test_sniff(data: bytes, expected: int | None) -> None:
    assert sniff(data) == expected
    assert sniff(bytearray(data)) == expected


def test_parse_local_header_both_versions() -> None:
    header, n = parse(local_header())
    assert (header.version, header.command, header.family, n) == (
        2,
        Command.LOCAL,
        Family.UNSPEC,
        16,
    )
    header, n = parse(local_header(1))
    assert (header.version, header.family, header.source, n) == (1, Family.UNSPEC, None, 15)


@pytest.mark.parametrize(
    ("fed", "expected"),
    [
        (b"", 15),
        (b"PRO", 12),
        (b"PROXY TCP4 ", 21),  # shortest TCP4 line is 32 bytes
        (b"PROXY TCP6 ", 11),  # shortest TCP6 line "PROXY TCP6 :: :: 0 0\r\n" is 22
        (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 6", 2),
        (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 6\r", 1),
        (b"\r\n", 14),
        (SIG, 4),
        (SIG + b"\x21\x11\x00\x0c", 12),
        (SIG + b"\x21\x11\x00\x0c" + bytes(5), 7),
    ],
)
def test_next_read_size(fed: bytes, expected: int) -> None:
    reader = HeaderReader()
    assert reader.feed(fed) is None
    assert reader.next_read_size() == expected


def test_reader_after_done_collects_trailing() -> None:
    reader = HeaderReader()
    header = reader.feed(b"PROXY UNKNOWN\r\nab")
    assert header is not None
    assert reader.feed(b"cd") is header
    assert reader.trailing == b"abcd"
    assert reader.consumed == 15


def test_reader_rejects_early_without_waiting() -> None:
    reader = HeaderReader()
    with pytest.raises(InvalidHeader) as info:
        reader.feed(SIG + b"\x21\x11\xff\xff")  # 65551 bytes > default 4096: no need to wait
    assert info.value.reason is Reason.TOO_LONG
    with pytest.raises(InvalidHeader):
        HeaderReader().feed(b"PROXY TCP4 1.2.3.4\n")


def test_v1_line_length() -> None:
    assert v1_line_length(b"PROXY UNKNOWN\r\nGET /") == 15
    assert v1_line_length(b"PROXY TCP4 1.2.3.4") is None
    with pytest.raises(InvalidHeader) as info:
        v1_line_length(b"PROXY " + b"x" * 120)
    assert info.value.reason is Reason.TOO_LONG


def test_options_validate() -> None:
    for bad in (dict(max_v2_size=15), dict(max_v2_size=65552), dict(max_tlvs=-1)):
        with pytest.raises(ValueError):
            ParseOptions(**bad)  # type: ignore[arg-type]
    ParseOptions(max_v2_size=65551)


def test_error_hierarchy() -> None:
    for cls in (IncompleteHeader, InvalidHeader):
        assert issubclass(cls, ProxyProtocolError)
    err = InvalidHeader(Reason.BAD_PORT, "port b'080'")
    assert err.reason == "bad_port"
    assert str(err) == "bad_port: port b'080'"


# ---- build: the balancer's fast path


@pytest.mark.parametrize(
    ("src", "dst", "family", "want_src", "want_dst"),
    [
        (("10.0.0.1", 1), ("10.0.0.2", 2), Family.INET, ("10.0.0.1", 1), ("10.0.0.2", 2)),
        (("2001:db8::1", 1), ("::1", 2), Family.INET6, ("2001:db8::1", 1), ("::1", 2)),
        (("10.0.0.1", 1), ("::1", 2), Family.INET6, ("::ffff:a00:1", 1), ("::1", 2)),
        (("::1", 1), ("10.0.0.2", 2), Family.INET6, ("::1", 1), ("::ffff:a00:2", 2)),
        (
            ("::ffff:10.0.0.1", 1),
            ("::ffff:127.0.0.1", 2),
            Family.INET6,
            ("::ffff:a00:1", 1),
            ("::ffff:7f00:1", 2),
        ),
        (("fe80::1%lo", 1), ("::1", 2), Family.INET6, ("fe80::1", 1), ("::1", 2)),
    ],
)
@pytest.mark.parametrize("version", [1, 2])
def test_build_families(
    version: int,
    src: tuple[str, int],
    dst: tuple[str, int],
    family: Family,
    want_src: tuple[str, int],
    want_dst: tuple[str, int],
) -> None:
    header, _ = parse(build(version, src, dst))
    assert (header.version, header.family, header.transport) == (version, family, Transport.STREAM)
    assert (header.source, header.destination) == (want_src, want_dst)


def test_build_exact_bytes() -> None:
    assert build(1, ("192.0.2.1", 56324), ("198.51.100.2", 443)) == (
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"
    )
    assert build(2, ("192.0.2.1", 56324), ("198.51.100.2", 443)) == v2(0x21, 0x11, TCP4_BLOCK)
    with_tlv = build(2, ("192.0.2.1", 56324), ("198.51.100.2", 443), tlvs=[TLV(2, b"h")])
    assert with_tlv == v2(0x21, 0x11, TCP4_BLOCK + tlv(2, b"h"))


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((2, ("example.com", 1), ("10.0.0.1", 2)), {}),
        ((2, ("10.0.0.1", -1), ("10.0.0.1", 2)), {}),
        ((2, ("10.0.0.1", 1), ("10.0.0.1", 65536)), {}),
        ((2, ("10.0.0.1", 1), ("10.0.0.1", "80")), {}),
        ((3, ("10.0.0.1", 1), ("10.0.0.1", 2)), {}),
        ((1, ("10.0.0.1", 1), ("10.0.0.1", 2)), {"tlvs": [(2, b"x")]}),
        ((2, ("10.0.0.1", 1), ("10.0.0.1", 2)), {"tlvs": [(256, b"x")]}),
        ((2, ("10.0.0.1", 1), ("10.0.0.1", 2)), {"tlvs": [(2, bytes(70000))]}),
        ((2, ("10.0.0.1", 1), ("10.0.0.1", 2)), {"tlvs": [(3, b"12")]}),
        ((2, ("10.0.0.1", 1), ("10.0.0.1", 2)), {"tlvs": [(2, "text, not bytes")]}),
        ((2, ("10.0.0.1", 1), ("10.0.0.1", 2)), {"tlvs": [("2", b"x")]}),
        ((2, ("10.0.0.1", 1), ("10.0.0.1", 2)), {"tlvs": [7]}),
        ((2, ("10.0.0.1", 1), ("10.0.0.1", 2)), {"tlvs": [(1, 2, 3)]}),
        ((2, (b"10.0.0.1", 1), ("10.0.0.1", 2)), {}),
        ((2, (["10.0.0.1"], 1), ("10.0.0.1", 2)), {}),
    ],
)
def test_build_rejects_with_project_error(args: tuple, kwargs: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidHeader) as info:
        build(*args, **kwargs)
    assert info.value.reason is Reason.UNENCODABLE


@pytest.mark.parametrize(
    "header",
    [
        ProxyHeader(1, Command.PROXY, Family.INET, Transport.STREAM, ("::1", 1), ("1.2.3.4", 2)),
        ProxyHeader(1, Command.PROXY, Family.UNIX, Transport.STREAM, "/a", "/b"),
        ProxyHeader(1, Command.PROXY, Family.INET, Transport.DGRAM, ("1.1.1.1", 1), ("1.2.3.4", 2)),
        ProxyHeader(
            1, Command.PROXY, Family.UNSPEC, Transport.UNSPEC, None, None, (TLV(1, b"h2"),)
        ),
        ProxyHeader(
            2, Command.PROXY, Family.INET, Transport.UNSPEC, ("1.1.1.1", 1), ("1.2.3.4", 2)
        ),
        ProxyHeader(2, Command.PROXY, Family.INET6, Transport.STREAM, None, None),
        ProxyHeader(2, Command.PROXY, Family.UNIX, Transport.STREAM, "x" * 109, "/b"),
        ProxyHeader(
            2, Command.PROXY, Family.INET, Transport.STREAM, ("1.1.1.1", 70000), ("1.2.3.4", 2)
        ),
        ProxyHeader(3, Command.PROXY, Family.UNSPEC, Transport.UNSPEC, None, None),
        ProxyHeader(
            2, Command.PROXY, Family.UNSPEC, Transport.UNSPEC, None, None, (TLV(4, bytes(65535)),)
        ),
    ],
)
def test_encode_rejects_with_project_error(header: ProxyHeader) -> None:
    with pytest.raises(InvalidHeader) as info:
        encode(header)
    assert info.value.reason is Reason.UNENCODABLE


def test_encode_v1_local_is_unknown() -> None:
    local = ProxyHeader(1, Command.LOCAL, Family.UNSPEC, Transport.UNSPEC, None, None)
    assert encode(local) == b"PROXY UNKNOWN\r\n"


# ---- accessors


def test_accessors_read_first_tlv_of_each_type() -> None:
    header, _ = parse(BY_ID["v2-alpn-authority"].data)
    assert header.alpn == b"h2"
    assert header.authority == "example.com"
    assert header.unique_id is None and header.ssl is None and header.crc32c is None
    assert header.client == ("192.0.2.1", 56324)
    header, _ = parse(BY_ID["v2-duplicates-and-unknown-kept"].data)
    assert header.authority == "a"
    assert [t.value for t in header.tlvs if t.type == TLVType.AUTHORITY] == [b"a", b"b"]


def test_ssl_accessor_every_subtype() -> None:
    header, _ = parse(BY_ID["v2-ssl-all-subtypes"].data)
    ssl = header.ssl
    assert ssl is not None
    assert (ssl.client, ssl.verify) == (0x07, 0)
    assert ssl.ssl and ssl.cert_conn and ssl.cert_sess and ssl.verified
    assert ssl.version == "TLSv1.3"
    assert ssl.cn == "client.example"
    assert ssl.cipher == "TLS_AES_128_GCM_SHA256"
    assert ssl.sig_alg == "RSA-SHA256"
    assert ssl.key_alg == "RSA2048"
    assert ssl.group == "X25519"
    assert ssl.sig_scheme == "rsa_pss_rsae_sha256"
    assert ssl.client_cert == b"\x30\x82\x01\x0a"
    assert ssl.to_tlv() == TLV(TLVType.SSL, SSL_VALUE)


def test_ssl_info_without_cert_is_not_verified() -> None:
    info = SSLInfo(client=0x01, verify=0)
    assert info.ssl and not info.verified and info.version is None and info.client_cert is None
    assert struct.unpack("!BI", info.to_tlv().value) == (1, 0)


def test_cloud_accessors() -> None:
    header, _ = parse(BY_ID["v2-cloud-custom-tlvs"].data)
    assert header.aws_vpce_id == "vpce-08d2bf15fac5001c9"
    assert header.azure_link_id == 0x12345678
    assert header.gcp_psc_id == 0x0102030405060708
    header, _ = parse(BY_ID["v2-netns"].data)
    assert header.netns == "blue"
    assert header.aws_vpce_id is None and header.azure_link_id is None and header.gcp_psc_id is None


def test_crc_accessor_and_unique_id() -> None:
    header, _ = parse(BY_ID["v2-crc32c"].data)
    assert header.crc32c == int.from_bytes(BY_ID["v2-crc32c"].data[-4:], "big")
    header, _ = parse(BY_ID["v2-unique-id-128"].data)
    assert header.unique_id == b"u" * 128


def test_header_is_frozen_and_slotted() -> None:
    header, _ = parse(BY_ID["v2-tcp4"].data)
    with pytest.raises(AttributeError):
        header.version = 1  # type: ignore[misc]
    assert not hasattr(header, "__dict__")
    assert hash(header) == hash(parse(BY_ID["v2-tcp4"].data)[0])
