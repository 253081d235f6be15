"""Named policy switches for the places where real peers disagree; strict by default."""

from __future__ import annotations

from dataclasses import dataclass

#: The largest v2 header the wire format allows: 16 fixed bytes + a 16-bit length.
V2_MAX_POSSIBLE = 16 + 0xFFFF


@dataclass(frozen=True, slots=True)
class ParseOptions:
    """How strict the parser is.

    ``allow_ipv4_in_tcp6``: accept plain dotted-quad IPv4 text in a v1 ``TCP6`` line (it is
    converted to the v4-mapped IPv6 address). A v4-mapped address (``::ffff:1.2.3.4``) is valid
    IPv6 text and always accepted.
    ``allow_v1_unknown_long``: accept ``PROXY UNKNOWN <anything>\\r\\n`` (the spec allows it and
    tells receivers to ignore the rest of the line); when false only ``PROXY UNKNOWN\\r\\n``.
    ``max_v2_size``: the largest v2 header accepted, fixed part included (16..65551). Raise it
    when peers send client certificates (PP2_SUBTYPE_SSL_CLIENT_CERT).
    ``max_tlvs``: the most top-level TLVs accepted in one v2 header.
    """

    allow_ipv4_in_tcp6: bool = False
    allow_v1_unknown_long: bool = True
    max_v2_size: int = 4096
    max_tlvs: int = 256

    def __post_init__(self) -> None:
        if not 16 <= self.max_v2_size <= V2_MAX_POSSIBLE:
            raise ValueError(f"max_v2_size must be within 16..{V2_MAX_POSSIBLE}")
        if self.max_tlvs < 0:
            raise ValueError("max_tlvs must be >= 0")


DEFAULT_OPTIONS = ParseOptions()
