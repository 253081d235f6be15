"""Spec vectors shared by the codec tests: (id, wire bytes, expected outcome).

The v2 bytes are assembled here with struct, independently of the codec's encoder.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from l4lb.proxy_protocol import (
    TLV,
    Command,
    Family,
    ParseOptions,
    ProxyHeader,
    Reason,
    Transport,
)
from l4lb.proxy_protocol.checksum import crc32c_python

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
P, L = Command.PROXY, Command.LOCAL
INET, INET6, UNIX, UNSPEC = Family.INET, Family.INET6, Family.UNIX, Family.UNSPEC
STREAM, DGRAM, TNONE = Transport.STREAM, Transport.DGRAM, Transport.UNSPEC
STRICT = ParseOptions()


def v2(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return SIG + struct.pack("!BBH", ver_cmd, fam, n) + body


def tlv(t: int, value: bytes) -> bytes:
    return struct.pack("!BH", t, len(value)) + value


def ipv4_block(src: str, dst: str, sp: int, dp: int) -> bytes:
    a = bytes(int(x) for x in src.split("."))
    b = bytes(int(x) for x in dst.split("."))
    return a + b + struct.pack("!HH", sp, dp)


def with_crc(ver_cmd: int, fam: int, addr: bytes, tlvs_before: bytes = b"") -> bytes:
    """A v2 header whose last TLV is a correct CRC32C (computed with the pure-Python CRC)."""
    body = addr + tlvs_before + tlv(0x03, b"\0\0\0\0")
    raw = v2(ver_cmd, fam, body)
    crc = crc32c_python(raw)
    return raw[:-4] + crc.to_bytes(4, "big")


V6_MAX = ":".join(["ffff"] * 8)
LOOP6 = bytes(15) + b"\x01"
MAPPED = bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 1])
TCP4_BLOCK = ipv4_block("192.0.2.1", "198.51.100.2", 56324, 443)
TCP6_BLOCK = bytes.fromhex("20010db8000000000000000000000001") + LOOP6 + struct.pack("!HH", 1, 2)
SSL_VALUE = (
    struct.pack("!BI", 0x07, 0)
    + tlv(0x21, b"TLSv1.3")
    + tlv(0x22, b"client.example")
    + tlv(0x23, b"TLS_AES_128_GCM_SHA256")
    + tlv(0x24, b"RSA-SHA256")
    + tlv(0x25, b"RSA2048")
    + tlv(0x26, b"X25519")
    + tlv(0x27, b"rsa_pss_rsae_sha256")
    + tlv(0x28, b"\x30\x82\x01\x0a")
)


def h(
    version: int,
    command: Command,
    family: Family,
    transport: Transport,
    source: object = None,
    destination: object = None,
    tlvs: tuple[TLV, ...] = (),
) -> ProxyHeader:
    return ProxyHeader(version, command, family, transport, source, destination, tlvs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Valid:
    id: str
    data: bytes
    header: ProxyHeader
    options: ParseOptions = STRICT


@dataclass(frozen=True)
class Invalid:
    id: str
    data: bytes
    reason: Reason
    kind: str = "invalid"  # "invalid", "not", or "incomplete"
    options: ParseOptions = STRICT


TCP4_HDR = h(1, P, INET, STREAM, ("192.0.2.1", 56324), ("198.51.100.2", 443))
V1_UNKNOWN = h(1, P, UNSPEC, TNONE)
V2_TCP4 = h(2, P, INET, STREAM, ("192.0.2.1", 56324), ("198.51.100.2", 443))

VALID: list[Valid] = [
    Valid("v1-tcp4", b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n", TCP4_HDR),
    Valid(
        "v1-tcp4-max",
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        h(1, P, INET, STREAM, ("255.255.255.255", 65535), ("255.255.255.255", 65535)),
    ),
    Valid(
        "v1-tcp4-zero-port",
        b"PROXY TCP4 0.0.0.0 10.0.0.1 0 80\r\n",
        h(1, P, INET, STREAM, ("0.0.0.0", 0), ("10.0.0.1", 80)),
    ),
    Valid(
        "v1-tcp6-max",
        f"PROXY TCP6 {V6_MAX} {V6_MAX} 65535 65535\r\n".encode(),
        h(1, P, INET6, STREAM, (V6_MAX, 65535), (V6_MAX, 65535)),
    ),
    Valid(
        "v1-tcp6-canonical",
        b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::1 1 65535\r\n",
        h(1, P, INET6, STREAM, ("2001:db8::1", 1), ("::1", 65535)),
    ),
    Valid(
        "v1-tcp6-v4-mapped",
        b"PROXY TCP6 ::ffff:192.0.2.1 :: 4000 80\r\n",
        h(1, P, INET6, STREAM, ("::ffff:c000:201", 4000), ("::", 80)),
    ),
    Valid(
        "v1-tcp6-ipv4-allowed",
        b"PROXY TCP6 192.0.2.1 ::1 1 2\r\n",
        h(1, P, INET6, STREAM, ("::ffff:c000:201", 1), ("::1", 2)),
        ParseOptions(allow_ipv4_in_tcp6=True),
    ),
    Valid("v1-unknown", b"PROXY UNKNOWN\r\n", V1_UNKNOWN),
    Valid(
        "v1-unknown-long-107",
        f"PROXY UNKNOWN {V6_MAX} {V6_MAX} 65535 65535\r\n".encode(),
        V1_UNKNOWN,
    ),
    Valid("v1-unknown-garbage-ignored", b"PROXY UNKNOWN whatever  is\there\r\n", V1_UNKNOWN),
    Valid("v2-tcp4", v2(0x21, 0x11, TCP4_BLOCK), V2_TCP4),
    Valid(
        "v2-udp4",
        v2(0x21, 0x12, TCP4_BLOCK),
        h(2, P, INET, DGRAM, ("192.0.2.1", 56324), ("198.51.100.2", 443)),
    ),
    Valid(
        "v2-tcp6",
        v2(0x21, 0x21, TCP6_BLOCK),
        h(2, P, INET6, STREAM, ("2001:db8::1", 1), ("::1", 2)),
    ),
    Valid(
        "v2-udp6",
        v2(0x21, 0x22, TCP6_BLOCK),
        h(2, P, INET6, DGRAM, ("2001:db8::1", 1), ("::1", 2)),
    ),
    Valid(
        "v2-tcp6-v4-mapped",
        v2(0x21, 0x21, MAPPED + LOOP6 + b"\x00\x01\x00\x02"),
        h(2, P, INET6, STREAM, ("::ffff:c000:201", 1), ("::1", 2)),
    ),
    Valid(
        "v2-unix-stream",
        v2(0x21, 0x31, b"/run/a.sock".ljust(108, b"\0") + b"/run/b.sock".ljust(108, b"\0")),
        h(2, P, UNIX, STREAM, "/run/a.sock", "/run/b.sock"),
    ),
    Valid(
        "v2-unix-dgram-abstract",
        v2(0x21, 0x32, b"\0abstract".ljust(108, b"\0") + b"/dev/log".ljust(108, b"\0")),
        h(2, P, UNIX, DGRAM, "\0abstract", "/dev/log"),
    ),
    Valid("v2-local", v2(0x20, 0x00, b""), h(2, L, UNSPEC, TNONE)),
    Valid(
        "v2-local-dummy-inet-block",
        v2(0x20, 0x11, bytes(12)),
        h(2, L, INET, STREAM),
    ),
    Valid(
        "v2-local-short-block-ignored",
        v2(0x20, 0x21, bytes(7)),
        h(2, L, INET6, STREAM),
    ),
    Valid(
        "v2-local-with-tlv",
        v2(0x20, 0x00, tlv(0x04, b"")),
        h(2, L, UNSPEC, TNONE, tlvs=(TLV(0x04, b""),)),
    ),
    # LOCAL: the receiver discards the protocol block (spec 2.2). What follows the family's
    # address block is kept as TLVs when it parses as TLVs, and ignored when it does not.
    Valid(
        "v2-local-unspec-dummy-inet-block",
        v2(0x20, 0x00, ipv4_block("127.0.0.1", "127.0.0.1", 8080, 8080)),
        h(2, L, UNSPEC, TNONE),
    ),
    Valid("v2-local-unspec-100-not-tlvs", v2(0x20, 0x00, b"\xff" * 100), h(2, L, UNSPEC, TNONE)),
    Valid(
        "v2-local-unix-100-not-tlvs",
        v2(0x20, 0x31, bytes(216) + b"\xff" * 100),
        h(2, L, UNIX, STREAM),
    ),
    Valid(
        "v2-local-inet-stray-byte-after-block",
        v2(0x20, 0x11, TCP4_BLOCK + b"\x01"),
        h(2, L, INET, STREAM),
    ),
    Valid(
        "v2-local-bad-ssl-tlv-ignored",
        v2(0x20, 0x00, tlv(0x20, b"\x01")),
        h(2, L, UNSPEC, TNONE),
    ),
    Valid(
        "v2-local-too-many-tlvs-ignored",
        v2(0x20, 0x00, tlv(4, b"") * 3),
        h(2, L, UNSPEC, TNONE),
        ParseOptions(max_tlvs=2),
    ),
    Valid(
        "v2-proxy-unspec",
        v2(0x21, 0x00, b""),
        h(2, P, UNSPEC, TNONE),
    ),
    Valid(
        "v2-alpn-authority",
        v2(0x21, 0x11, TCP4_BLOCK + tlv(0x01, b"h2") + tlv(0x02, b"example.com")),
        h(
            2,
            P,
            INET,
            STREAM,
            ("192.0.2.1", 56324),
            ("198.51.100.2", 443),
            (TLV(0x01, b"h2"), TLV(0x02, b"example.com")),
        ),
    ),
    Valid(
        "v2-noop-padding",
        v2(0x21, 0x11, TCP4_BLOCK + tlv(0x04, b"\0\0\0")),
        h(2, P, INET, STREAM, ("192.0.2.1", 56324), ("198.51.100.2", 443), (TLV(4, bytes(3)),)),
    ),
    Valid(
        "v2-unique-id-128",
        v2(0x21, 0x11, TCP4_BLOCK + tlv(0x05, b"u" * 128)),
        h(
            2,
            P,
            INET,
            STREAM,
            ("192.0.2.1", 56324),
            ("198.51.100.2", 443),
            (TLV(5, b"u" * 128),),
        ),
    ),
    Valid(
        "v2-ssl-all-subtypes",
        v2(0x21, 0x11, TCP4_BLOCK + tlv(0x20, SSL_VALUE)),
        h(
            2,
            P,
            INET,
            STREAM,
            ("192.0.2.1", 56324),
            ("198.51.100.2", 443),
            (TLV(0x20, SSL_VALUE),),
        ),
    ),
    Valid(
        "v2-netns",
        v2(0x21, 0x11, TCP4_BLOCK + tlv(0x30, b"blue")),
        h(2, P, INET, STREAM, ("192.0.2.1", 56324), ("198.51.100.2", 443), (TLV(0x30, b"blue"),)),
    ),
    Valid(
        "v2-cloud-custom-tlvs",
        v2(
            0x21,
            0x11,
            TCP4_BLOCK
            + tlv(0xEA, b"\x01vpce-08d2bf15fac5001c9")
            + tlv(0xEE, b"\x01" + (0x12345678).to_bytes(4, "little"))
            + tlv(0xE0, (0x0102030405060708).to_bytes(8, "big")),
        ),
        h(
            2,
            P,
            INET,
            STREAM,
            ("192.0.2.1", 56324),
            ("198.51.100.2", 443),
            (
                TLV(0xEA, b"\x01vpce-08d2bf15fac5001c9"),
                TLV(0xEE, b"\x01\x78\x56\x34\x12"),
                TLV(0xE0, bytes(range(1, 9))),
            ),
        ),
    ),
    Valid(
        "v2-duplicates-and-unknown-kept",
        v2(0x21, 0x11, TCP4_BLOCK + tlv(0x02, b"a") + tlv(0xF1, b"x") + tlv(0x02, b"b")),
        h(
            2,
            P,
            INET,
            STREAM,
            ("192.0.2.1", 56324),
            ("198.51.100.2", 443),
            (TLV(2, b"a"), TLV(0xF1, b"x"), TLV(2, b"b")),
        ),
    ),
    Valid(
        "v2-crc32c",
        with_crc(0x21, 0x11, TCP4_BLOCK, tlv(0x02, b"example.com")),
        h(
            2,
            P,
            INET,
            STREAM,
            ("192.0.2.1", 56324),
            ("198.51.100.2", 443),
            (
                TLV(2, b"example.com"),
                TLV(3, with_crc(0x21, 0x11, TCP4_BLOCK, tlv(0x02, b"example.com"))[-4:]),
            ),
        ),
    ),
    Valid(
        "v2-crc32c-on-local",
        with_crc(0x20, 0x00, b""),
        h(2, L, UNSPEC, TNONE, tlvs=(TLV(3, with_crc(0x20, 0x00, b"")[-4:]),)),
    ),
    Valid(
        "v2-client-cert-large",
        v2(
            0x21,
            0x11,
            TCP4_BLOCK + tlv(0x20, struct.pack("!BI", 3, 0) + tlv(0x28, b"\x30" * 6000)),
        ),
        h(
            2,
            P,
            INET,
            STREAM,
            ("192.0.2.1", 56324),
            ("198.51.100.2", 443),
            (TLV(0x20, struct.pack("!BI", 3, 0) + tlv(0x28, b"\x30" * 6000)),),
        ),
        ParseOptions(max_v2_size=65551),
    ),
]

INVALID: list[Invalid] = [
    # --- not a PROXY header at all
    Invalid("not-http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Reason.BAD_SIGNATURE, "not"),
    Invalid("not-tls", bytes.fromhex("160301020001000200"), Reason.BAD_SIGNATURE, "not"),
    Invalid(
        "not-lowercase-proxy", b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n", Reason.BAD_SIGNATURE, "not"
    ),
    Invalid(
        "not-v2-sig-off-by-one",
        SIG[:11] + b"\x0b" + b"\x21\x11\x00\x0c",
        Reason.BAD_SIGNATURE,
        "not",
    ),
    # --- incomplete
    Invalid("incomplete-empty", b"", Reason.TRUNCATED, "incomplete"),
    Invalid("incomplete-prox", b"PROX", Reason.TRUNCATED, "incomplete"),
    Invalid(
        "incomplete-v1-no-crlf",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443",
        Reason.TRUNCATED,
        "incomplete",
    ),
    Invalid("incomplete-v1-cr-only", b"PROXY UNKNOWN\r", Reason.TRUNCATED, "incomplete"),
    Invalid("incomplete-v2-sig-prefix", SIG[:7], Reason.TRUNCATED, "incomplete"),
    Invalid("incomplete-v2-fixed", SIG + b"\x21\x11\x00", Reason.TRUNCATED, "incomplete"),
    Invalid("incomplete-v2-body", v2(0x21, 0x11, TCP4_BLOCK)[:-1], Reason.TRUNCATED, "incomplete"),
    # --- v1 malformed
    Invalid(
        "v1-no-space-after-proxy", b"PROXY\tTCP4 1.2.3.4 1.2.3.4 1 2\r\n", Reason.BAD_SIGNATURE
    ),
    Invalid("v1-lowercase-tcp4", b"PROXY tcp4 1.2.3.4 1.2.3.4 1 2\r\n", Reason.BAD_FAMILY),
    Invalid("v1-udp4", b"PROXY UDP4 1.2.3.4 1.2.3.4 1 2\r\n", Reason.BAD_FAMILY),
    Invalid("v1-double-space", b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n", Reason.BAD_SYNTAX),
    Invalid("v1-trailing-space", b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 \r\n", Reason.BAD_SYNTAX),
    Invalid("v1-missing-port", b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", Reason.BAD_SYNTAX),
    Invalid("v1-empty-protocol", b"PROXY \r\n", Reason.BAD_SYNTAX),
    Invalid("v1-four-words", b"PROXY one two three four\r\n", Reason.BAD_SYNTAX),
    Invalid("v1-protocol-only", b"PROXY TCP4\r\n", Reason.BAD_SYNTAX),
    Invalid("v1-lone-lf", b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n", Reason.BAD_CRLF),
    Invalid("v1-lone-cr", b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\rX\r\n", Reason.BAD_CRLF),
    Invalid("v1-lf-mid-line", b"PROXY TCP4 1.2.3.4\n1.2.3.4 1 2\r\n", Reason.BAD_CRLF),
    Invalid("v1-port-leading-zero", b"PROXY TCP4 1.2.3.4 1.2.3.4 080 2\r\n", Reason.BAD_PORT),
    Invalid("v1-port-plus", b"PROXY TCP4 1.2.3.4 1.2.3.4 +80 2\r\n", Reason.BAD_PORT),
    Invalid("v1-port-underscore", b"PROXY TCP4 1.2.3.4 1.2.3.4 8_0 2\r\n", Reason.BAD_PORT),
    Invalid(
        "v1-port-unicode-digits", "PROXY TCP4 1.2.3.4 1.2.3.4 ８０ 2\r\n".encode(), Reason.BAD_PORT
    ),
    Invalid("v1-port-65536", b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n", Reason.BAD_PORT),
    Invalid("v1-port-negative", b"PROXY TCP4 1.2.3.4 1.2.3.4 -1 2\r\n", Reason.BAD_PORT),
    Invalid("v1-port-hex", b"PROXY TCP4 1.2.3.4 1.2.3.4 0x50 2\r\n", Reason.BAD_PORT),
    Invalid("v1-ipv4-leading-zero", b"PROXY TCP4 01.2.3.4 1.2.3.4 1 2\r\n", Reason.BAD_ADDRESS),
    Invalid("v1-ipv4-three-parts", b"PROXY TCP4 1.2.3 1.2.3.4 1 2\r\n", Reason.BAD_ADDRESS),
    Invalid("v1-ipv4-octet-256", b"PROXY TCP4 1.2.3.256 1.2.3.4 1 2\r\n", Reason.BAD_ADDRESS),
    Invalid("v1-ipv6-in-tcp4", b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n", Reason.BAD_ADDRESS),
    Invalid("v1-ipv4-in-tcp6-strict", b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", Reason.BAD_ADDRESS),
    Invalid("v1-ipv6-zone-id", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", Reason.BAD_ADDRESS),
    Invalid("v1-ipv6-bad", b"PROXY TCP6 1::2::3 ::1 1 2\r\n", Reason.BAD_ADDRESS),
    Invalid(
        "v1-non-ascii-address", "PROXY TCP4 １.2.3.4 1.2.3.4 1 2\r\n".encode(), Reason.BAD_ADDRESS
    ),
    Invalid("v1-no-crlf-in-107", b"PROXY UNKNOWN " + b"a" * 93, Reason.TOO_LONG),
    Invalid(
        "v1-108-bytes-with-crlf",
        f"PROXY UNKNOWN {V6_MAX} {V6_MAX} 65535 655355\r\n".encode(),
        Reason.TOO_LONG,
    ),
    Invalid(
        "v1-unknown-long-disallowed",
        b"PROXY UNKNOWN ::1 ::1 1 2\r\n",
        Reason.BAD_SYNTAX,
        options=ParseOptions(allow_v1_unknown_long=False),
    ),
    # --- v2 malformed
    Invalid("v2-version-1", v2(0x11, 0x11, TCP4_BLOCK), Reason.BAD_VERSION),
    Invalid("v2-version-3", v2(0x31, 0x11, TCP4_BLOCK), Reason.BAD_VERSION),
    Invalid("v2-command-2", v2(0x22, 0x11, TCP4_BLOCK), Reason.BAD_COMMAND),
    Invalid("v2-command-f", v2(0x2F, 0x11, TCP4_BLOCK), Reason.BAD_COMMAND),
    Invalid("v2-family-4", v2(0x21, 0x41, TCP4_BLOCK), Reason.BAD_FAMILY),
    Invalid("v2-transport-3", v2(0x21, 0x13, TCP4_BLOCK), Reason.BAD_FAMILY),
    Invalid("v2-inet-unspec-transport", v2(0x21, 0x10, TCP4_BLOCK), Reason.BAD_FAMILY),
    Invalid("v2-unspec-with-transport", v2(0x21, 0x01, b""), Reason.BAD_FAMILY),
    Invalid("v2-too-long-default", v2(0x21, 0x11, TCP4_BLOCK, length=4081), Reason.TOO_LONG),
    Invalid(
        "v2-too-long-option",
        v2(0x21, 0x11, TCP4_BLOCK + tlv(4, bytes(20))),
        Reason.TOO_LONG,
        options=ParseOptions(max_v2_size=40),
    ),
    Invalid("v2-short-inet-block", v2(0x21, 0x11, TCP4_BLOCK[:8]), Reason.BAD_ADDRESS),
    Invalid("v2-short-inet6-block", v2(0x21, 0x21, TCP4_BLOCK), Reason.BAD_ADDRESS),
    Invalid("v2-short-unix-block", v2(0x21, 0x31, bytes(215)), Reason.BAD_ADDRESS),
    Invalid(
        "v2-tlv-overflow", v2(0x21, 0x11, TCP4_BLOCK + b"\x02\x00\x09abc"), Reason.TLV_OVERFLOW
    ),
    Invalid("v2-tlv-stray-bytes", v2(0x21, 0x11, TCP4_BLOCK + b"\x04\x00"), Reason.TLV_OVERFLOW),
    Invalid(
        "v2-tlv-stray-after-valid",
        v2(0x21, 0x11, TCP4_BLOCK + tlv(4, b"") + b"\x01"),
        Reason.TLV_OVERFLOW,
    ),
    Invalid(
        "v2-crc-mismatch",
        with_crc(0x21, 0x11, TCP4_BLOCK)[:-1] + b"\x00",
        Reason.CRC_MISMATCH,
    ),
    Invalid(
        "v2-crc-address-tampered",
        with_crc(0x21, 0x11, TCP4_BLOCK)[:16] + b"\x7f" + with_crc(0x21, 0x11, TCP4_BLOCK)[17:],
        Reason.CRC_MISMATCH,
    ),
    Invalid(
        "v2-local-crc-mismatch",
        with_crc(0x20, 0x00, b"")[:-1] + b"\x00",
        Reason.CRC_MISMATCH,
    ),
    Invalid(
        "v2-local-inet-crc-mismatch",
        with_crc(0x20, 0x11, TCP4_BLOCK)[:16] + b"\x7f" + with_crc(0x20, 0x11, TCP4_BLOCK)[17:],
        Reason.CRC_MISMATCH,
    ),
    Invalid("v2-crc-wrong-length", v2(0x21, 0x11, TCP4_BLOCK + tlv(3, b"\0\0\0")), Reason.BAD_TLV),
    Invalid(
        "v2-crc-twice",
        v2(0x21, 0x11, TCP4_BLOCK + tlv(3, b"\0\0\0\0") + tlv(3, b"\0\0\0\0")),
        Reason.BAD_TLV,
    ),
    Invalid(
        "v2-unique-id-129",
        v2(0x21, 0x11, TCP4_BLOCK + tlv(5, b"u" * 129)),
        Reason.UNIQUE_ID_TOO_LONG,
    ),
    Invalid(
        "v2-ssl-too-short",
        v2(0x21, 0x11, TCP4_BLOCK + tlv(0x20, b"\x01\0\0\0")),
        Reason.BAD_SSL_TLV,
    ),
    Invalid(
        "v2-ssl-sub-overflow",
        v2(0x21, 0x11, TCP4_BLOCK + tlv(0x20, b"\x01\0\0\0\0" + b"\x21\x00\x10TLS")),
        Reason.BAD_SSL_TLV,
    ),
    Invalid(
        "v2-ssl-sub-stray",
        v2(0x21, 0x11, TCP4_BLOCK + tlv(0x20, b"\x01\0\0\0\0\x21")),
        Reason.BAD_SSL_TLV,
    ),
    Invalid(
        "v2-too-many-tlvs",
        v2(0x21, 0x11, TCP4_BLOCK + tlv(4, b"") * 3),
        Reason.TLV_TOO_MANY,
        options=ParseOptions(max_tlvs=2),
    ),
]
