"""The parsed header as one immutable value, plus the enums and the TLV record it is made of."""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from l4lb.proxy_protocol.errors import ProxyProtocolError

Address = tuple[str, int]
"""``(host, port)``; host in canonical text (IPv6 as ``ipaddress`` compresses it)."""


class Command(enum.IntEnum):
    LOCAL = 0x0
    PROXY = 0x1


class Family(enum.IntEnum):
    UNSPEC = 0x0
    INET = 0x1
    INET6 = 0x2
    UNIX = 0x3


class Transport(enum.IntEnum):
    UNSPEC = 0x0
    STREAM = 0x1
    DGRAM = 0x2


class TLVType(enum.IntEnum):
    """Registered PP2 types (doc/proxy-protocol.txt section 2.2) and the cloud custom ones."""

    ALPN = 0x01
    AUTHORITY = 0x02
    CRC32C = 0x03
    NOOP = 0x04
    UNIQUE_ID = 0x05
    SSL = 0x20
    SSL_VERSION = 0x21
    SSL_CN = 0x22
    SSL_CIPHER = 0x23
    SSL_SIG_ALG = 0x24
    SSL_KEY_ALG = 0x25
    SSL_GROUP = 0x26
    SSL_SIG_SCHEME = 0x27
    SSL_CLIENT_CERT = 0x28
    NETNS = 0x30
    GCP = 0xE0
    AWS = 0xEA
    AZURE = 0xEE


#: Bits of the SSL TLV's ``client`` field.
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

#: Subtype of the AWS (0xEA) and Azure (0xEE) TLVs that carries the endpoint/link id.
PP2_SUBTYPE_AWS_VPCE_ID = 0x01
PP2_SUBTYPE_AZURE_PRIVATEENDPOINT_LINKID = 0x01

#: The family/transport bytes v2 allows, and the address block each one implies.
ADDRESS_SIZES: dict[int, int] = {
    0x00: 0,
    0x11: 12,
    0x12: 12,
    0x21: 36,
    0x22: 36,
    0x31: 216,
    0x32: 216,
}


class TLV(NamedTuple):
    """One type-length-value record, as it was on the wire (``type`` is the raw byte).

    A NamedTuple rather than a dataclass: headers carry several, and building a tuple is the
    cheapest immutable record CPython has (the TLV loop is the parser's hottest code).
    """

    type: int
    value: bytes

    def __repr__(self) -> str:
        try:
            name = TLVType(self.type).name
        except ValueError:
            name = f"0x{self.type:02X}"
        return f"TLV({name}, {self.value!r})"


_SUB = struct.Struct("!BH")
_SSL_HEAD = struct.Struct("!BI")


@dataclass(frozen=True, slots=True)
class SSLInfo:
    """The PP2_TYPE_SSL TLV: client bits, verify result and its sub-TLVs (wire order)."""

    client: int
    verify: int
    tlvs: tuple[TLV, ...] = ()

    def _text(self, t: int) -> str | None:
        for tlv in self.tlvs:
            if tlv.type == t:
                return tlv.value.decode("utf-8", "replace")
        return None

    @property
    def ssl(self) -> bool:
        """The client connected over SSL/TLS (PP2_CLIENT_SSL)."""
        return bool(self.client & PP2_CLIENT_SSL)

    @property
    def cert_conn(self) -> bool:
        return bool(self.client & PP2_CLIENT_CERT_CONN)

    @property
    def cert_sess(self) -> bool:
        return bool(self.client & PP2_CLIENT_CERT_SESS)

    @property
    def verified(self) -> bool:
        """A client certificate was presented and verified (verify == 0 with a cert)."""
        return self.verify == 0 and bool(
            self.client & (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS)
        )

    @property
    def version(self) -> str | None:
        return self._text(TLVType.SSL_VERSION)

    @property
    def cn(self) -> str | None:
        return self._text(TLVType.SSL_CN)

    @property
    def cipher(self) -> str | None:
        return self._text(TLVType.SSL_CIPHER)

    @property
    def sig_alg(self) -> str | None:
        return self._text(TLVType.SSL_SIG_ALG)

    @property
    def key_alg(self) -> str | None:
        return self._text(TLVType.SSL_KEY_ALG)

    @property
    def group(self) -> str | None:
        return self._text(TLVType.SSL_GROUP)

    @property
    def sig_scheme(self) -> str | None:
        return self._text(TLVType.SSL_SIG_SCHEME)

    @property
    def client_cert(self) -> bytes | None:
        """The client certificate, DER, when the sender included it (0x28)."""
        for tlv in self.tlvs:
            if tlv.type == TLVType.SSL_CLIENT_CERT:
                return tlv.value
        return None

    def to_tlv(self) -> TLV:
        """This SSL information as a PP2_TYPE_SSL TLV, ready for ``encode``/``build``."""
        parts = [_SSL_HEAD.pack(self.client, self.verify)]
        for sub in self.tlvs:
            parts.append(_SUB.pack(sub.type, len(sub.value)))
            parts.append(sub.value)
        return TLV(TLVType.SSL, b"".join(parts))


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed (or to-be-encoded) PROXY header, v1 or v2.

    ``source``/``destination`` are ``(host, port)`` for INET and INET6, a path ``str`` for UNIX
    (an abstract socket name starts with ``"\\0"``), and ``None`` for LOCAL, UNSPEC and v1
    ``UNKNOWN``. ``tlvs`` keeps wire order and duplicates; the properties read the first of a type.
    """

    version: int
    command: Command
    family: Family
    transport: Transport
    source: Address | str | None
    destination: Address | str | None
    tlvs: tuple[TLV, ...] = ()

    def __init__(
        self,
        version: int,
        command: Command,
        family: Family,
        transport: Transport,
        source: Address | str | None,
        destination: Address | str | None,
        tlvs: tuple[TLV, ...] = (),
    ) -> None:
        # Frozen dataclasses set each field through object.__setattr__, which costs ~1 us per
        # header; the slot descriptors below do the same job several times faster.
        _h_version(self, version)
        _h_command(self, command)
        _h_family(self, family)
        _h_transport(self, transport)
        _h_source(self, source)
        _h_destination(self, destination)
        _h_tlvs(self, tlvs)

    def tlv(self, type_: int) -> bytes | None:
        """The value of the first TLV of ``type_``, or None."""
        for t in self.tlvs:
            if t.type == type_:
                return t.value
        return None

    @property
    def is_local(self) -> bool:
        return self.command is Command.LOCAL

    @property
    def client(self) -> Address | None:
        """The real client ``(host, port)`` for INET/INET6 PROXY headers, else None."""
        s = self.source
        return s if isinstance(s, tuple) else None

    @property
    def alpn(self) -> bytes | None:
        return self.tlv(TLVType.ALPN)

    @property
    def authority(self) -> str | None:
        v = self.tlv(TLVType.AUTHORITY)
        return None if v is None else v.decode("utf-8", "replace")

    @property
    def unique_id(self) -> bytes | None:
        return self.tlv(TLVType.UNIQUE_ID)

    @property
    def crc32c(self) -> int | None:
        v = self.tlv(TLVType.CRC32C)
        return None if v is None or len(v) != 4 else int.from_bytes(v, "big")

    @property
    def netns(self) -> str | None:
        v = self.tlv(TLVType.NETNS)
        return None if v is None else v.decode("utf-8", "replace")

    @property
    def ssl(self) -> SSLInfo | None:
        v = self.tlv(TLVType.SSL)
        if v is None:
            return None
        from l4lb.proxy_protocol.tlv import parse_ssl  # validated at parse time; cheap here

        try:
            return parse_ssl(v)
        except ProxyProtocolError:
            return None

    @property
    def aws_vpce_id(self) -> str | None:
        """AWS PrivateLink VPC endpoint id (type 0xEA, subtype 0x01)."""
        for t in self.tlvs:
            if t.type == TLVType.AWS and t.value[:1] == b"\x01":
                return t.value[1:].decode("ascii", "replace")
        return None

    @property
    def azure_link_id(self) -> int | None:
        """Azure Private Link LINKID (type 0xEE, subtype 0x01, little-endian uint32)."""
        for t in self.tlvs:
            if t.type == TLVType.AZURE and len(t.value) == 5 and t.value[0] == 0x01:
                return int.from_bytes(t.value[1:5], "little")
        return None

    @property
    def gcp_psc_id(self) -> int | None:
        """Google Cloud Private Service Connect connection id (type 0xE0, 8 bytes big-endian)."""
        for t in self.tlvs:
            if t.type == TLVType.GCP and len(t.value) == 8:
                return int.from_bytes(t.value, "big")
        return None


_Setter = Callable[[Any, Any], None]


def _setter(cls: type, name: str) -> _Setter:
    setter: _Setter = cls.__dict__[name].__set__  # the slot's member descriptor
    return setter


_h_version = _setter(ProxyHeader, "version")
_h_command = _setter(ProxyHeader, "command")
_h_family = _setter(ProxyHeader, "family")
_h_transport = _setter(ProxyHeader, "transport")
_h_source = _setter(ProxyHeader, "source")
_h_destination = _setter(ProxyHeader, "destination")
_h_tlvs = _setter(ProxyHeader, "tlvs")
_slot_tlvs = ProxyHeader.__dict__["tlvs"]
_get_tlvs: Callable[[Any, Any], Any] = _slot_tlvs.__get__
_tuple_new = tuple.__new__


def decode_tlv_block(block: bytes) -> tuple[TLV, ...]:
    """The TLV records of a block the parser has already checked (bounds, CRC, special types).

    The parsers store a header's TLV bytes as they came (one slice) and this runs on the first
    read of ``ProxyHeader.tlvs``: a balancer that only wants the addresses never pays for the
    records. Nothing here can fail: the block was validated whole before the header existed.
    """
    out: list[TLV] = []
    append = out.append
    new = _tuple_new
    pos = 0
    end = len(block)
    while pos < end:
        vstart = pos + 3
        stop = vstart + ((block[pos + 1] << 8) | block[pos + 2])
        append(new(TLV, (block[pos], block[vstart:stop])))
        pos = stop
    return tuple(out)


def _read_tlvs(self: ProxyHeader) -> tuple[TLV, ...]:
    value = _get_tlvs(self, ProxyHeader)
    if type(value) is bytes:  # a parser's validated block, decoded on first access
        value = decode_tlv_block(value)
        _h_tlvs(self, value)
    tlvs: tuple[TLV, ...] = value
    return tlvs


# ``tlvs`` stays a dataclass field (eq, hash, repr, replace and pickling read it by name); its
# slot may hold the raw block until the property below first decodes it.
setattr(ProxyHeader, "tlvs", property(_read_tlvs, _h_tlvs, doc="The TLVs, in wire order."))  # noqa: B010


class _Unfrozen:
    """Same slot layout as ProxyHeader, without the frozen ``__setattr__``.

    ``make_header`` fills one of these with plain attribute stores and then re-labels it a
    ProxyHeader (CPython allows ``__class__`` assignment between identical slot layouts).
    That is about a third cheaper than any frozen ``__init__``, and the parsers build one
    header per connection. Only the parsers use it; the result is an ordinary ProxyHeader.
    """

    __slots__ = ProxyHeader.__slots__


assert _Unfrozen.__slots__ == (
    "version",
    "command",
    "family",
    "transport",
    "source",
    "destination",
    "tlvs",
), "ProxyHeader's fields changed: update _Unfrozen's users"


def make_header(
    version: int,
    command: Command,
    family: Family,
    transport: Transport,
    source: Address | str | None,
    destination: Address | str | None,
    tlvs: tuple[TLV, ...] | bytes = (),
) -> ProxyHeader:
    """A ProxyHeader, built the fast way (see ``_Unfrozen``).

    ``tlvs`` may be a TLV block the caller has validated (see :func:`decode_tlv_block`).
    """
    h: Any = _Unfrozen()
    h.version = version
    h.command = command
    h.family = family
    h.transport = transport
    h.source = source
    h.destination = destination
    h.tlvs = tlvs
    h.__class__ = ProxyHeader
    header: ProxyHeader = h
    return header
