"""A set of CIDR blocks with a lookup whose cost does not grow with the number of blocks.

Each block is stored as an integer network key in a hash set for its prefix length, so a lookup
is one shift and one set probe per *distinct prefix length* in the set (at most 33 for IPv4, 129
for IPv6; a deny list of 100,000 blocks typically uses a dozen). Addresses are parsed with
``inet_pton`` and IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``) are matched as IPv4, so a
dual-stack listener sees the same policy as an IPv4 one.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["CidrError", "CidrSet", "ip_to_int", "parse_cidr"]

_V4MAPPED_PREFIX = 0xFFFF << 32
_V4MAPPED_MASK = ((1 << 96) - 1) << 32


class CidrError(ValueError):
    """A CIDR block or address that cannot be parsed; the message names where it came from."""


def ip_to_int(ip: str) -> tuple[int, int]:
    """``(version, integer)`` of an address; IPv4-mapped IPv6 comes back as IPv4.

    A zone suffix (``fe80::1%eth0``) is ignored. Raises :class:`CidrError` for anything else.
    """
    if ":" not in ip:
        try:
            return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
        except OSError:
            raise CidrError(f"{ip!r} is not an IPv4 address") from None
    if "%" in ip:
        ip = ip.split("%", 1)[0]
    try:
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, ip), "big")
    except OSError:
        raise CidrError(f"{ip!r} is not an IPv6 address") from None
    if value & _V4MAPPED_MASK == _V4MAPPED_PREFIX:
        return 4, value & 0xFFFFFFFF
    return 6, value


def parse_cidr(text: str) -> tuple[int, int, int]:
    """``(version, network, prefix_length)`` of ``"10.0.0.0/8"``, ``"2001:db8::/32"`` or an address.

    Strict, as a security list should be: host bits set below the prefix are an error (did the
    author mean a wider or a narrower block?). ``::ffff:0:0/96`` and longer become IPv4 blocks.
    """
    text = text.strip()
    addr, slash, plen_text = text.partition("/")
    if "%" in addr:
        bare = addr.partition("%")[0] + slash + plen_text
        raise CidrError(
            f"{text!r}: zone ids are not allowed in CIDRs (a block matches addresses on every "
            f"interface); write {bare!r}"
        )
    if ":" in addr:
        version, bits = 6, 128
        try:
            value = int.from_bytes(socket.inet_pton(socket.AF_INET6, addr), "big")
        except OSError:
            raise CidrError(f"{text!r} is not a CIDR block: bad IPv6 address {addr!r}") from None
    else:
        version, bits = 4, 32
        try:
            value = int.from_bytes(socket.inet_pton(socket.AF_INET, addr), "big")
        except OSError:
            raise CidrError(f"{text!r} is not a CIDR block: bad IPv4 address {addr!r}") from None
    if slash:
        if not plen_text.isascii() or not plen_text.isdigit() or len(plen_text) > 3:
            raise CidrError(f"{text!r} is not a CIDR block: bad prefix length {plen_text!r}")
        plen = int(plen_text)
        if plen > bits:
            raise CidrError(f"{text!r}: prefix length {plen} is longer than {bits} bits")
    else:
        plen = bits
    host_bits = bits - plen
    if value & ((1 << host_bits) - 1):
        network = value >> host_bits << host_bits
        shown = _format(version, network)
        raise CidrError(
            f"{text!r} has host bits set below /{plen}; write {shown}/{plen} for the block"
        )
    if version == 6 and plen >= 96 and value & _V4MAPPED_MASK == _V4MAPPED_PREFIX:
        return 4, value & 0xFFFFFFFF, plen - 96
    return version, value, plen


def _format(version: int, value: int) -> str:
    if version == 4:
        return socket.inet_ntop(socket.AF_INET, value.to_bytes(4, "big"))
    return socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, "big"))


class CidrSet:
    """CIDR blocks of both families; ``"10.1.2.3" in cidrs`` tests an address.

    Build it from strings (``CidrSet(["10.0.0.0/8"])``), a file (:meth:`from_file`), or both
    (:meth:`update`, :meth:`load`). Lookups take a string address as the socket module gives it.
    """

    __slots__ = ("_count", "_v4", "_v4_probe", "_v6", "_v6_probe")

    def __init__(self, cidrs: Iterable[str] = ()) -> None:
        self._v4: dict[int, set[int]] = {}
        self._v6: dict[int, set[int]] = {}
        self._v4_probe: tuple[tuple[int, set[int]], ...] = ()
        self._v6_probe: tuple[tuple[int, set[int]], ...] = ()
        self._count = 0
        self.update(cidrs)

    @classmethod
    def from_file(cls, path: str | Path) -> CidrSet:
        """A set loaded from ``path`` (see :meth:`load`)."""
        cidrs = cls()
        cidrs.load(path)
        return cidrs

    def update(self, cidrs: Iterable[str], *, where: str = "") -> None:
        """Add blocks; an error names ``where`` (e.g. ``"listeners[0].deny[3]"``) when given."""
        for index, text in enumerate(cidrs):
            try:
                self._add(*parse_cidr(text))
            except CidrError as err:
                if not where:
                    raise
                raise CidrError(f"{where}[{index}]: {err}") from None
        self._rebuild()

    def load(self, path: str | Path) -> None:
        """Add the blocks of a file: one CIDR or address a line, ``#`` starts a comment.

        Errors name ``file:line``; an unreadable file is reported with the OS reason.
        """
        try:
            with open(path, encoding="utf-8") as file:
                for lineno, line in enumerate(file, 1):
                    entry = line.split("#", 1)[0].strip()
                    if not entry:
                        continue
                    try:
                        self._add(*parse_cidr(entry))
                    except CidrError as err:
                        raise CidrError(f"{path}:{lineno}: {err}") from None
        except UnicodeDecodeError as err:
            raise CidrError(f"{path}: not a UTF-8 text file ({err.reason})") from None
        except OSError as err:
            raise CidrError(f"{path}: cannot read: {err.strerror or err}") from None
        finally:
            self._rebuild()

    def _add(self, version: int, network: int, plen: int) -> None:
        table = self._v4 if version == 4 else self._v6
        bits = 32 if version == 4 else 128
        keys = table.setdefault(plen, set())
        key = network >> (bits - plen)
        if key not in keys:
            keys.add(key)
            self._count += 1

    def _rebuild(self) -> None:
        # Probe the widest blocks first: "0.0.0.0/0" or a /8 matches after a single probe.
        self._v4_probe = tuple((32 - plen, keys) for plen, keys in sorted(self._v4.items()))
        self._v6_probe = tuple((128 - plen, keys) for plen, keys in sorted(self._v6.items()))

    def contains_int(self, version: int, value: int) -> bool:
        """Membership of an address already converted with :func:`ip_to_int`."""
        for shift, keys in self._v4_probe if version == 4 else self._v6_probe:
            if value >> shift in keys:
                return True
        return False

    def __contains__(self, ip: object) -> bool:
        if not isinstance(ip, str):
            return False
        try:
            version, value = ip_to_int(ip)
        except CidrError:
            return False
        return self.contains_int(version, value)

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator[str]:
        for version, table, bits in ((4, self._v4, 32), (6, self._v6, 128)):
            for plen, keys in sorted(table.items()):
                for key in sorted(keys):
                    yield f"{_format(version, key << (bits - plen))}/{plen}"

    def prefix_lengths(self) -> dict[int, tuple[int, ...]]:
        """Distinct prefix lengths per IP version: the number of probes a lookup makes."""
        return {4: tuple(sorted(self._v4)), 6: tuple(sorted(self._v6))}

    def __repr__(self) -> str:
        return f"<CidrSet {self._count} blocks>"
