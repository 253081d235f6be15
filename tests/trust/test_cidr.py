"""CidrSet: parsing (strict, errors that say where), lookups, files of 100,000 blocks."""

from __future__ import annotations

import ipaddress
import random
from pathlib import Path

import pytest

from l4lb.trust.cidr import CidrError, CidrSet, ip_to_int, parse_cidr

PARSE = [
    ("10.0.0.0/8", (4, 0x0A000000, 8)),
    ("0.0.0.0/0", (4, 0, 0)),
    ("192.0.2.7", (4, 0xC0000207, 32)),
    ("192.0.2.7/32", (4, 0xC0000207, 32)),
    ("::/0", (6, 0, 0)),
    ("2001:db8::/32", (6, 0x20010DB8 << 96, 32)),
    ("::1", (6, 1, 128)),
    ("::ffff:10.0.0.0/104", (4, 0x0A000000, 8)),
    ("::ffff:0:0/96", (4, 0, 0)),
    ("  172.16.0.0/12 ", (4, 0xAC100000, 12)),
]

BAD = [
    ("10.0.0.1/8", "host bits set below /8; write 10.0.0.0/8"),
    ("10.0.0.0/33", "prefix length 33 is longer than 32"),
    ("2001:db8::/129", "longer than 128"),
    ("10.0.0.0/", "bad prefix length"),
    ("10.0.0.0/+8", "bad prefix length"),
    ("10.0.0.0/08x", "bad prefix length"),
    ("10.0.0/8", "bad IPv4 address"),
    ("010.0.0.0/8", "bad IPv4 address"),
    ("2001:db8:::/32", "bad IPv6 address"),
    ("example.com/8", "bad IPv4 address"),
    ("", "bad IPv4 address"),
]


@pytest.mark.parametrize(("text", "expected"), PARSE)
def test_parse(text: str, expected: tuple[int, int, int]) -> None:
    assert parse_cidr(text) == expected


@pytest.mark.parametrize(("text", "message"), BAD)
def test_parse_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(CidrError, match=message.replace("/", "/").replace("+", r"\+")):
        parse_cidr(text)


ADDRESSES = [
    ("127.0.0.1", (4, 0x7F000001)),
    ("::ffff:127.0.0.1", (4, 0x7F000001)),
    ("::1", (6, 1)),
    ("fe80::1%lo", (6, (0xFE80 << 112) | 1)),
]


@pytest.mark.parametrize(("ip", "expected"), ADDRESSES)
def test_ip_to_int_normalises_v4_mapped(ip: str, expected: tuple[int, int]) -> None:
    assert ip_to_int(ip) == expected


LOOKUPS = [
    (["10.0.0.0/8"], "10.255.1.2", True),
    (["10.0.0.0/8"], "11.0.0.0", False),
    (["10.0.0.0/8"], "::ffff:10.1.1.1", True),
    (["10.0.0.0/8"], "::a01:101", False),  # ::10.1.1.1 is not v4-mapped
    (["127.0.0.1/32"], "127.0.0.1", True),
    (["127.0.0.1/32"], "127.0.0.9", False),
    (["0.0.0.0/0"], "203.0.113.9", True),
    (["0.0.0.0/0"], "2001:db8::1", False),
    (["::/0"], "2001:db8::1", True),
    (["::/0"], "192.0.2.1", False),
    (["2001:db8::/32", "192.0.2.0/24"], "2001:db8:ffff::1", True),
    (["2001:db8::/32", "192.0.2.0/24"], "2001:db9::1", False),
    (["::ffff:192.0.2.0/120"], "192.0.2.200", True),
    ([], "127.0.0.1", False),
    (["10.0.0.0/8"], "not an address", False),
]


@pytest.mark.parametrize(("cidrs", "ip", "expected"), LOOKUPS)
def test_lookup(cidrs: list[str], ip: str, expected: bool) -> None:
    assert (ip in CidrSet(cidrs)) is expected


def test_update_error_names_the_key_and_index() -> None:
    with pytest.raises(CidrError, match=r"listeners\[0\]\.deny\[1\]: '10\.0\.0\.1/8' has host"):
        CidrSet().update(["10.0.0.0/8", "10.0.0.1/8"], where="listeners[0].deny")


def test_duplicates_count_once_and_iter_round_trips() -> None:
    cidrs = CidrSet(["10.0.0.0/8", "10.0.0.0/8", "::1", "::ffff:1.2.3.4"])
    assert len(cidrs) == 3
    assert list(cidrs) == ["10.0.0.0/8", "1.2.3.4/32", "::1/128"]  # by prefix length
    assert CidrSet(list(cidrs)).prefix_lengths() == cidrs.prefix_lengths()


def test_load_file_with_comments(tmp_path: Path) -> None:
    path = tmp_path / "deny.txt"
    path.write_text(
        "# blocklist\n\n203.0.113.0/24   # a documentation net\n  2001:db8::/32\n198.51.100.42\n"
    )
    cidrs = CidrSet.from_file(path)
    assert len(cidrs) == 3
    assert "203.0.113.77" in cidrs
    assert "198.51.100.42" in cidrs
    assert "198.51.100.43" not in cidrs
    assert "2001:db8::5" in cidrs


def test_load_file_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "deny.txt"
    path.write_text("10.0.0.0/8\n# fine\n10.0.0.300/32\n")
    with pytest.raises(CidrError, match=rf"{path}:3: '10\.0\.0\.300/32' is not a CIDR block"):
        CidrSet.from_file(path)


def test_load_missing_or_binary_file(tmp_path: Path) -> None:
    with pytest.raises(CidrError, match="cannot read: No such file"):
        CidrSet.from_file(tmp_path / "absent.txt")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CidrError, match="not a UTF-8 text file"):
        CidrSet.from_file(binary)


def test_agrees_with_ipaddress_on_100k_random_blocks(tmp_path: Path) -> None:
    """100,000 random v4 and v6 blocks from a file; every answer agrees with ``ipaddress``."""
    rng = random.Random(4)
    v4 = {
        ipaddress.ip_network((rng.getrandbits(32), plen), strict=False)
        for plen in (rng.choice((16, 20, 24, 28, 32)) for _ in range(80_000))
    }
    v6 = {
        ipaddress.ip_network((rng.getrandbits(128), plen), strict=False)
        for plen in (rng.choice((32, 48, 64, 128)) for _ in range(20_000))
    }
    path = tmp_path / "big.txt"
    path.write_text("\n".join(str(n) for n in (*v4, *v6)) + "\n")
    cidrs = CidrSet.from_file(path)
    assert len(cidrs) == len(v4) + len(v6)
    assert len(cidrs.prefix_lengths()[4]) == 5

    v4_by_len: dict[int, set[int]] = {}
    for n in v4:
        v4_by_len.setdefault(n.prefixlen, set()).add(int(n.network_address) >> (32 - n.prefixlen))
    v6_by_len: dict[int, set[int]] = {}
    for n in v6:
        v6_by_len.setdefault(n.prefixlen, set()).add(int(n.network_address) >> (128 - n.prefixlen))

    def truth(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        table, bits = (v4_by_len, 32) if addr.version == 4 else (v6_by_len, 128)
        return any(int(addr) >> (bits - plen) in keys for plen, keys in table.items())

    nets = list(v4)[:500] + list(v6)[:500]
    probes: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for net in nets:  # inside a block, and its neighbours just outside
        probes.append(net.network_address + rng.randrange(net.num_addresses))
        if int(net.broadcast_address) + 1 < 2**net.max_prefixlen:
            probes.append(net.broadcast_address + 1)
    probes += [ipaddress.IPv4Address(rng.getrandbits(32)) for _ in range(2000)]
    probes += [ipaddress.IPv6Address(rng.getrandbits(128)) for _ in range(2000)]
    hits = 0
    for addr in probes:
        expected = truth(addr)
        hits += expected
        assert (str(addr) in cidrs) is expected, addr
        if addr.version == 4:
            assert (f"::ffff:{addr}" in cidrs) is expected
    assert hits >= 1000
