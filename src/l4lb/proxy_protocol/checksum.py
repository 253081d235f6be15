"""CRC32C (Castagnoli, RFC 4960 appendix B), as the PP2_TYPE_CRC32C TLV requires.

Uses the C implementation from ``google-crc32c`` when it is importable and a table-driven
pure-Python fallback otherwise; both give identical results, and the check is never skipped.
"""

from __future__ import annotations

from collections.abc import Callable


def _make_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_TABLE = _make_table()


def crc32c_python(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC32C of ``data`` continuing from ``crc`` (0 to start), in pure Python."""
    table = _TABLE
    c = crc ^ 0xFFFFFFFF
    for b in bytes(data):
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


crc32c_c: Callable[[bytes | bytearray | memoryview, int], int] | None
#: ``crc32c_bytes(data)``: CRC32C of a ``bytes`` object with no wrapper in between; the
#: parser's verification calls it through this module so tests can swap the implementation.
crc32c_bytes: Callable[[bytes], int]
try:
    import google_crc32c as _g

    if getattr(_g, "implementation", "c") != "c":  # its own fallback is slower than ours
        raise ImportError("google_crc32c has no C extension here")
    _extend = _g.extend
    _value = _g.value

    def _crc32c_c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
        if type(data) is not bytes:
            data = bytes(data)  # the C extension wants read-only buffers
        return int(_value(data) if crc == 0 else _extend(crc, data))

    crc32c_c = _crc32c_c
    crc32c_bytes = _value
    IMPLEMENTATION = "google-crc32c"
except ImportError:
    crc32c_c = None
    crc32c_bytes = crc32c_python
    IMPLEMENTATION = "python"


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC32C of ``data`` continuing from ``crc``, with the fastest implementation available."""
    fast = crc32c_c
    if fast is not None:
        return fast(data, crc)
    return crc32c_python(data, crc)
