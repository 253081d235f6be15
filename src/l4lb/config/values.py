"""Parsers for the small value languages of the config file: durations, addresses, CIDRs, rates.

Each parser takes the string as written and returns its compiled form, or raises ``ValueError`` with
a message that says what would be valid. The schema uses them to validate; the runtime uses them to
compile (seconds as float, ``(host, port)`` tuples, CIDR blocks as integers).
"""

from __future__ import annotations

import ipaddress
import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")

TLV_NAMES: dict[str, int] = {
    "alpn": 0x01,
    "authority": 0x02,
    "crc32c": 0x03,
    "noop": 0x04,
    "unique_id": 0x05,
    "ssl": 0x20,
    "netns": 0x30,
    "gcp": 0xE0,
    "aws": 0xEA,
    "azure": 0xEE,
}
"""PROXY v2 TLV types by the names the config uses (HAProxy's doc/proxy-protocol.txt, 2.2)."""

PASS_TLV_NAMES = ("unique_id", "authority", "alpn", "ssl", "netns", "aws", "azure", "gcp")


def parse_duration(text: str) -> float:
    """``"250ms"``, ``"1.5s"``, ``"10m"``, ``"2h"`` -> seconds."""
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(
            f"invalid duration {text!r}: expected a number and a unit (ms, s, m, h), "
            "such as '250ms', '1.5s', '10m', '2h'"
        )
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]


def parse_positive_duration(text: str) -> float:
    """Like :func:`parse_duration`, but zero is refused (a zero timeout or check interval would
    fail every connect, close every connection at once, or spin the event loop)."""
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(
            f"invalid duration {text!r}: must be greater than zero, such as '250ms' or '1s'"
        )
    return seconds


def parse_access_target(text: str) -> str:
    """``[log] access``: ``"stdout"``, ``"off"`` or a file path; an empty string is refused."""
    if not text.strip():
        raise ValueError(f"invalid value {text!r}: expected 'stdout', 'off' or a file path")
    return text


def parse_hostport(text: str) -> tuple[str, int]:
    """``"127.0.0.1:8443"`` or ``"[::1]:8443"`` -> ``(host, port)``; the host must be an IP."""
    hint = "expected IP:PORT such as '127.0.0.1:8443', or '[::1]:8443' for IPv6"
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"invalid address {text!r}: {hint}")
        version = 6
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"invalid address {text!r}: missing port; {hint}")
        if ":" in host:
            raise ValueError(f"invalid address {text!r}: IPv6 addresses need brackets; {hint}")
        version = 4
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"invalid address {text!r}: {host!r} is not an IP address (hostnames are not "
            f"resolved); {hint}"
        ) from None
    if ip.version != version:
        raise ValueError(f"invalid address {text!r}: {hint}")
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError(f"invalid address {text!r}: port must be 1..65535")
    return str(ip), int(port)


def format_hostport(host: str, port: int) -> str:
    """The inverse of :func:`parse_hostport`: brackets around IPv6 hosts."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_cidr(text: str) -> tuple[int, int, int]:
    """``"10.0.0.0/8"``, ``"::1/128"``, or a bare address (a /32 or /128), checked by the parser
    the balancer reads it with (:func:`l4lb.trust.cidr.parse_cidr`), so ``l4lb check`` accepts
    exactly what ``l4lb run`` can use. Returns ``(version, network, prefix_length)``."""
    from l4lb.trust import cidr  # imported here: l4lb.trust's own modules read this one

    try:
        return cidr.parse_cidr(text)
    except cidr.CidrError as err:
        raise ValueError(f"invalid CIDR: {err}") from None


def parse_rate(text: str) -> float:
    """``"50/s"``, ``"100/m"``, ``"10/h"`` -> events per second (must be > 0)."""
    m = _RATE.match(text)
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(
            f"invalid rate {text!r}: expected a positive count per unit, such as '50/s', '100/m'"
        )
    return float(m.group(1)) / _UNIT_SECONDS[m.group(2)]


def tlv_type(name: str | int) -> int:
    """A ``pass_tlvs`` entry -> its TLV type number."""
    if isinstance(name, int):
        if not 0 <= name <= 255:
            raise ValueError(f"invalid TLV type {name}: must be 0..255")
        return name
    if name not in PASS_TLV_NAMES:
        raise ValueError(
            f"unknown TLV name {name!r}: expected one of {', '.join(PASS_TLV_NAMES)} "
            "or a type number 0..255"
        )
    return TLV_NAMES[name]
