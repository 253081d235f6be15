"""Parsed TLVs are kept as the validated block and decoded on the first read of ``tlvs``:
nothing a user can observe differs from a header built with its TLVs at once."""

from __future__ import annotations

import copy
import dataclasses
import gc
import pickle

from l4lb.proxy_protocol import (
    TLV,
    Command,
    Family,
    ProxyHeader,
    TLVType,
    Transport,
    build,
    parse,
)

TLVS = (
    TLV(TLVType.ALPN, b"h2"),
    TLV(TLVType.AUTHORITY, b"www.example.com"),
    TLV(TLVType.UNIQUE_ID, b"0123456789abcdef"),
)
SRC, DST = ("192.0.2.1", 56324), ("198.51.100.2", 443)


def _parsed() -> ProxyHeader:
    header, _ = parse(build(2, SRC, DST, tlvs=TLVS))
    return header


def _eager() -> ProxyHeader:
    return ProxyHeader(2, Command.PROXY, Family.INET, Transport.STREAM, SRC, DST, TLVS)


def test_a_parsed_header_equals_and_hashes_as_one_built_whole() -> None:
    eager = _eager()
    assert type(eager.tlvs) is tuple and eager.tlvs == TLVS
    assert _parsed() == eager and eager == _parsed()
    assert hash(_parsed()) == hash(eager)
    assert repr(_parsed()) == repr(eager)


def test_reading_tlvs_decodes_once_and_keeps_wire_order() -> None:
    header = _parsed()
    first = header.tlvs
    assert first == TLVS and header.tlvs is first
    assert header.alpn == b"h2" and header.authority == "www.example.com"


def test_copies_pickles_and_replace_carry_the_tlvs() -> None:
    for other in (
        pickle.loads(pickle.dumps(_parsed())),
        copy.copy(_parsed()),
        copy.deepcopy(_parsed()),
        dataclasses.replace(_parsed(), source=("192.0.2.9", 1)),
    ):
        assert other.tlvs == TLVS


def test_the_block_is_not_the_input_buffer() -> None:
    """Only the TLV bytes are kept, not whatever followed the header in the caller's buffer."""
    wire = build(2, SRC, DST, tlvs=TLVS)
    header, n = parse(wire + b"x" * 10_000)
    held = [r for r in gc.get_referents(header) if isinstance(r, bytes)]
    assert held and all(len(r) < len(wire) for r in held)  # the block, before any read
    assert n == len(wire) and header.tlvs == TLVS
