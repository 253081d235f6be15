"""One-shot parsing and version sniffing; see reader.py for the incremental form."""

from __future__ import annotations

from l4lb.proxy_protocol.errors import IncompleteHeader, NotProxyProtocol
from l4lb.proxy_protocol.model import ProxyHeader
from l4lb.proxy_protocol.options import DEFAULT_OPTIONS, ParseOptions
from l4lb.proxy_protocol.v1 import SIGNATURE as V1_SIGNATURE
from l4lb.proxy_protocol.v1 import parse_v1
from l4lb.proxy_protocol.v2 import SIGNATURE as V2_SIGNATURE
from l4lb.proxy_protocol.v2 import parse_v2

Buffer = bytes | bytearray | memoryview


def sniff(data: Buffer) -> int | None:
    """Which version ``data`` starts with: 1 or 2; 0 if it cannot start a PROXY header; None
    if it is too short to tell (empty, or a strict prefix of a signature)."""
    head = bytes(data[:12])
    if head[:5] == V1_SIGNATURE:
        return 1
    if head == V2_SIGNATURE:
        return 2
    n = len(head)
    if n < 5 and V1_SIGNATURE.startswith(head):
        return None
    if n < 12 and V2_SIGNATURE.startswith(head):
        return None
    return 0


def parse(data: Buffer, options: ParseOptions = DEFAULT_OPTIONS) -> tuple[ProxyHeader, int]:
    """The header at the start of ``data`` and the number of bytes it occupies.

    Raises IncompleteHeader (a valid prefix), NotProxyProtocol (no signature) or InvalidHeader.
    """
    if type(data) is not bytes:
        data = bytes(data)
    # (slices compared, not startswith: a METH_VARARGS call costs more than the slice)
    if data[:12] == V2_SIGNATURE:
        return parse_v2(data, options)
    if data[:5] == V1_SIGNATURE:
        return parse_v1(data, options)
    version = sniff(data)
    if version is None:
        raise IncompleteHeader(f"{len(data)} bytes are a prefix of a signature")
    raise NotProxyProtocol(f"data starts with {data[:12]!r}, neither v1 nor v2 signature")
