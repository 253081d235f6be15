"""CRC32C: both implementations against known vectors (RFC 3720 B.4) and against each other."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l4lb.proxy_protocol import checksum as crc_module
from l4lb.proxy_protocol.checksum import IMPLEMENTATION, crc32c, crc32c_c, crc32c_python

KNOWN = [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


@pytest.mark.parametrize(("data", "expected"), KNOWN)
def test_python_known_vectors(data: bytes, expected: int) -> None:
    assert crc32c_python(data) == expected


@pytest.mark.parametrize(("data", "expected"), KNOWN)
def test_default_known_vectors(data: bytes, expected: int) -> None:
    assert crc32c(data) == expected


def test_c_implementation_is_used_when_installed() -> None:
    pytest.importorskip("google_crc32c")  # a dev dependency: installed in .venv and CI
    assert crc32c_c is not None
    assert IMPLEMENTATION == "google-crc32c"


@given(data=st.binary(max_size=2048), split=st.integers(0, 2048))
def test_implementations_agree_and_extend(data: bytes, split: int) -> None:
    expected = crc32c_python(data)
    assert crc32c(data) == expected
    assert crc32c_python(data[split:], crc32c_python(data[:split])) == expected
    if crc32c_c is not None:
        assert crc32c_c(data, 0) == expected
        assert crc32c_c(data[split:], crc32c_c(data[:split], 0)) == expected


def test_parser_verifies_with_python_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the C extension absent the check still runs (it is never skipped)."""
    from l4lb.proxy_protocol import InvalidHeader, Reason, build, parse

    calls: list[int] = []

    def python_only(data: bytes) -> int:
        calls.append(len(data))
        return crc32c_python(data)

    monkeypatch.setattr(crc_module, "crc32c_c", None)
    monkeypatch.setattr(crc_module, "crc32c_bytes", python_only)
    wire = build(2, ("10.0.0.1", 1), ("10.0.0.2", 2), crc32c=True)
    header, _ = parse(wire)
    assert header.crc32c == crc32c_python(wire[:-4] + bytes(4))
    with pytest.raises(InvalidHeader) as info:
        parse(wire[:-1] + bytes([wire[-1] ^ 1]))
    assert info.value.reason is Reason.CRC_MISMATCH
    assert calls == [len(wire), len(wire)]  # both checks ran through the Python fallback
