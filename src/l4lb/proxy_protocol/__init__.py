"""The PROXY protocol (v1 text and v2 binary), sans-IO: bytes in, ProxyHeader out, and back.

>>> header, length = parse(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\\r\\n")
>>> header.source
('192.0.2.1', 56324)

``HeaderReader`` decodes incrementally, ``sniff`` tells the version from a few bytes,
``encode`` writes a ProxyHeader, ``build`` writes one straight from socket addresses.
"""

from l4lb.proxy_protocol.checksum import IMPLEMENTATION as CRC32C_IMPLEMENTATION
from l4lb.proxy_protocol.checksum import crc32c
from l4lb.proxy_protocol.encode import build, encode, local_header
from l4lb.proxy_protocol.errors import (
    IncompleteHeader,
    InvalidHeader,
    NotProxyProtocol,
    ProxyProtocolError,
    Reason,
)
from l4lb.proxy_protocol.model import (
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_CERT_SESS,
    PP2_CLIENT_SSL,
    TLV,
    Address,
    Command,
    Family,
    ProxyHeader,
    SSLInfo,
    TLVType,
    Transport,
)
from l4lb.proxy_protocol.options import DEFAULT_OPTIONS, ParseOptions
from l4lb.proxy_protocol.parse import parse, sniff
from l4lb.proxy_protocol.reader import HeaderReader
from l4lb.proxy_protocol.v1 import MAX_LENGTH as V1_MAX_LENGTH
from l4lb.proxy_protocol.v1 import v1_line_length
from l4lb.proxy_protocol.v2 import SIGNATURE as V2_SIGNATURE

__all__ = [
    "CRC32C_IMPLEMENTATION",
    "DEFAULT_OPTIONS",
    "PP2_CLIENT_CERT_CONN",
    "PP2_CLIENT_CERT_SESS",
    "PP2_CLIENT_SSL",
    "TLV",
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "Address",
    "Command",
    "Family",
    "HeaderReader",
    "IncompleteHeader",
    "InvalidHeader",
    "NotProxyProtocol",
    "ParseOptions",
    "ProxyHeader",
    "ProxyProtocolError",
    "Reason",
    "SSLInfo",
    "TLVType",
    "Transport",
    "build",
    "crc32c",
    "encode",
    "local_header",
    "parse",
    "sniff",
    "v1_line_length",
]
