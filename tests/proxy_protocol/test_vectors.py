"""Every spec vector, fed whole, one byte at a time, and split at every offset."""

from __future__ import annotations

import pytest

from l4lb.proxy_protocol import (
    HeaderReader,
    IncompleteHeader,
    InvalidHeader,
    NotProxyProtocol,
    ProxyProtocolError,
    parse,
)

from .vectors import INVALID, VALID, Invalid, Valid

PAYLOAD = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"
KINDS = {"invalid": InvalidHeader, "not": NotProxyProtocol, "incomplete": IncompleteHeader}


def test_table_is_big_enough() -> None:
    assert len(VALID) + len(INVALID) >= 40
    assert len({v.id for v in VALID} | {v.id for v in INVALID}) == len(VALID) + len(INVALID)


def _feed_all(reader: HeaderReader, chunks: list[bytes]) -> object:
    result = None
    for chunk in chunks:
        result = reader.feed(chunk)
    return result


def _splits(data: bytes) -> list[list[bytes]]:
    out = [[data], [data[i : i + 1] for i in range(len(data))]]
    out += [[data[:i], data[i:]] for i in range(1, len(data))]
    return out


@pytest.mark.parametrize("vec", VALID, ids=lambda v: v.id)
def test_valid_whole(vec: Valid) -> None:
    header, length = parse(vec.data + PAYLOAD, vec.options)
    assert header == vec.header
    assert length == len(vec.data)
    assert parse(vec.data, vec.options) == (vec.header, len(vec.data))
    assert parse(memoryview(bytearray(vec.data)), vec.options) == (vec.header, len(vec.data))


@pytest.mark.parametrize("vec", VALID, ids=lambda v: v.id)
def test_valid_incremental(vec: Valid) -> None:
    data = vec.data + PAYLOAD
    step = 1 if len(data) < 400 else 97  # the client-cert vector is 6 kB: sample its offsets
    splits = (
        _splits(data) if step == 1 else [[data[:i], data[i:]] for i in range(1, len(data), step)]
    )
    for chunks in splits:
        reader = HeaderReader(vec.options)
        assert _feed_all(reader, chunks) == vec.header
        assert reader.header == vec.header
        assert reader.consumed == len(vec.data)
        assert reader.trailing == PAYLOAD
        assert reader.next_read_size() == 0


@pytest.mark.parametrize("vec", VALID, ids=lambda v: v.id)
def test_valid_prefixes_are_incomplete(vec: Valid) -> None:
    for i in range(0, len(vec.data), 1 if len(vec.data) < 400 else 211):
        with pytest.raises(IncompleteHeader):
            parse(vec.data[:i], vec.options)


@pytest.mark.parametrize("vec", VALID, ids=lambda v: v.id)
def test_next_read_size_never_reads_past_the_header(vec: Valid) -> None:
    """A reader that takes exactly next_read_size() bytes each time ends on the header's end."""
    data = vec.data + PAYLOAD
    reader = HeaderReader(vec.options)
    pos = 0
    while reader.header is None:
        want = reader.next_read_size()
        assert want > 0
        assert pos + want <= len(vec.data), f"would read past the header at {pos}+{want}"
        reader.feed(data[pos : pos + want])
        pos += want
    assert pos == len(vec.data)
    assert reader.trailing == b""


@pytest.mark.parametrize("vec", INVALID, ids=lambda v: v.id)
def test_invalid_whole(vec: Invalid) -> None:
    with pytest.raises(KINDS[vec.kind]) as info:
        parse(vec.data, vec.options)
    assert info.value.reason is vec.reason
    assert str(info.value)  # a message, not an empty string


@pytest.mark.parametrize("vec", INVALID, ids=lambda v: v.id)
def test_invalid_incremental(vec: Invalid) -> None:
    for chunks in _splits(vec.data):
        reader = HeaderReader(vec.options)
        if vec.kind == "incomplete":
            assert _feed_all(reader, chunks) is None
            assert reader.header is None and reader.trailing == b""
            assert reader.next_read_size() > 0
            continue
        with pytest.raises(KINDS[vec.kind]) as info:
            _feed_all(reader, chunks)
        assert info.value.reason is vec.reason
        # The error sticks: a later feed raises it again instead of resuming.
        with pytest.raises(ProxyProtocolError):
            reader.feed(b"more")
