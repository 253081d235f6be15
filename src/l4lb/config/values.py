"""Parsers for the small value languages of the config file: durations, addresses, CIDRs, rates.

Each parser takes the string as written and returns its compiled form, or raises ``ValueError`` with
a message that says what would be valid. The schema uses them to validate; the runtime uses them to
compile (seconds as float, ``(host, port)`` tuples, CIDR blocks as integers).
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass

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


MAX_DURATION = 2147483.647
"""The longest duration accepted, in seconds: 2^31-1 ms (about 24.8 days, written '596h'), the
same ceiling HAProxy puts on its timeouts. Longer values are typos (and a 400-digit number of
seconds would be infinity to a float, and an overflow to the event loop's timers)."""

TIMEOUT_FLOOR = 0.010
"""The shortest timeout (connect, idle, PROXY header, health check timeout): 10ms. Below it the
event loop's timer granularity and the scheduling noise of a busy machine are the whole budget,
so every connect, header or check would fail."""

CHECK_INTERVAL_FLOOR = 0.100
"""The shortest health check interval: 100ms. HAProxy's default ``inter`` is 2s; checking more
often than ten times a second per backend spends the balancer's CPU on checks (an interval of
'0.0001ms' took 3.4s of CPU in 3s)."""


def parse_duration(text: str) -> float:
    """``"250ms"``, ``"1.5s"``, ``"10m"``, ``"2h"`` -> seconds (at most :data:`MAX_DURATION`)."""
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(_duration_hint(text))
    seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    if not seconds <= MAX_DURATION:  # also catches inf from a few hundred digits
        raise ValueError(
            f"invalid duration {text!r}: at most '596h' (2^31-1 ms, HAProxy's limit too)"
        )
    return seconds


_WRONG_UNITS = {
    **dict.fromkeys(("sec", "secs", "second", "seconds"), "s"),
    **dict.fromkeys(("min", "mins", "minute", "minutes"), "m"),
    **dict.fromkeys(("hr", "hrs", "hour", "hours"), "h"),
    **dict.fromkeys(("msec", "msecs", "millis", "millisecond", "milliseconds"), "ms"),
}
_NUMBER_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def _duration_hint(text: str) -> str:
    """Why ``text`` is not a duration, with the right form where it can be guessed."""
    units = "units: ms, s, m, h"
    m = _NUMBER_UNIT.match(text)
    if m is None:
        return (
            f"invalid duration {text!r}: expected a number and a unit (ms, s, m, h), "
            "such as '250ms', '1.5s', '10m', '2h'"
        )
    number, unit = m.group(1), m.group(2)
    if not unit:
        return f"invalid duration {text!r}: the unit is missing: write '{number}s' ({units})"
    lower = unit.lower()
    if lower in _UNIT_SECONDS:
        return f"invalid duration {text!r}: units are lower case: write '{number}{lower}'"
    if lower in _WRONG_UNITS:
        right = f"{number}{_WRONG_UNITS[lower]}"
    elif lower in ("d", "day", "days"):
        right = f"{float(number) * 24:g}h"
    elif lower in ("us", "µs", "ns"):
        return f"invalid duration {text!r}: unknown unit {unit!r}; the smallest unit is 'ms'"
    else:
        return f"invalid duration {text!r}: unknown unit {unit!r}; {units}, such as '10s'"
    return f"invalid duration {text!r}: unknown unit {unit!r}: write '{right}' ({units})"


def parse_positive_duration(text: str) -> float:
    """Like :func:`parse_duration`, but zero is refused (a zero timeout or check interval would
    fail every connect, close every connection at once, or spin the event loop)."""
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(
            f"invalid duration {text!r}: must be greater than zero, such as '250ms' or '1s'"
        )
    return seconds


def _at_least(text: str, floor: float, floor_text: str, why: str) -> float:
    seconds = parse_positive_duration(text)
    if seconds < floor:
        raise ValueError(f"invalid duration {text!r}: must be at least {floor_text!r} ({why})")
    return seconds


def parse_timeout(text: str) -> float:
    """A timeout: a duration of at least :data:`TIMEOUT_FLOOR` (10ms)."""
    return _at_least(
        text, TIMEOUT_FLOOR, "10ms", "a shorter timeout would expire before the peer can answer"
    )


def parse_check_interval(text: str) -> float:
    """A health check interval: a duration of at least :data:`CHECK_INTERVAL_FLOOR` (100ms)."""
    return _at_least(
        text,
        CHECK_INTERVAL_FLOOR,
        "100ms",
        "checks more often would spend the balancer's CPU on them; HAProxy's default is 2s",
    )


RESOLVE_FLOOR = 0.100
"""The shortest re-resolution interval (``[resolver] resolve_min``): 100ms. A record with TTL 0
would otherwise be asked for in a loop, spending the balancer's CPU and the DNS server's."""


def parse_resolve_interval(text: str) -> float:
    """``resolve_min`` / ``resolve_max``: a duration of at least :data:`RESOLVE_FLOOR`."""
    return _at_least(
        text, RESOLVE_FLOOR, "100ms", "a TTL of 0 would otherwise be asked for in a loop"
    )


def parse_nameserver(text: str) -> tuple[str, int]:
    """A nameserver: ``IP`` (port 53), ``IP:PORT`` or ``[IPv6]:PORT``."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return parse_hostport(text)
    if "%" in text:
        raise ValueError(f"invalid nameserver {text!r}: IPv6 zone ids are not supported")
    return str(ipaddress.ip_address(text)), 53


def parse_access_target(text: str) -> str:
    """``[log] access``: ``"stdout"``, ``"off"``, a file path or a syslog target
    (:func:`l4lb.observe.syslog.parse_target`); an empty string is refused."""
    from l4lb.observe import syslog  # its formats, parsed where they are used

    if not text.strip():
        raise ValueError(
            f"invalid value {text!r}: expected 'stdout', 'off', a file path or a syslog target "
            "such as 'syslog:/dev/log'"
        )
    if syslog.is_target(text):
        syslog.parse_target(text)
    return text


def parse_events_target(text: str) -> str:
    """``[log] events``: ``"stderr"`` or a syslog target."""
    from l4lb.observe import syslog

    if text != "stderr":
        if not syslog.is_target(text):
            raise ValueError(
                f"invalid value {text!r}: expected 'stderr' or a syslog target such as "
                "'syslog:/dev/log' or 'syslog+udp://127.0.0.1:514'"
            )
        syslog.parse_target(text)
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
    if "%" in host:
        raise ValueError(
            f"invalid address {text!r}: IPv6 zone ids ('%{host.partition('%')[2]}') are not "
            "supported; use a global or unique-local address"
        )
    if not host:
        raise ValueError(
            f"invalid address {text!r}: the IP address is missing; to listen on every address "
            f"write '0.0.0.0:{port}' (IPv4) or '[::]:{port}' (IPv6)"
        )
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if host.replace(".", "").isdigit():
            raise ValueError(
                f"invalid address {text!r}: {host!r} is not an IP address (IPv4 is four numbers "
                f"0..255 separated by dots); {hint}"
            ) from None
        raise ValueError(
            f"invalid address {text!r}: {host!r} is not an IP address (hostnames are not "
            f"resolved); {hint}"
        ) from None
    if ip.version != version:
        raise ValueError(f"invalid address {text!r}: {hint}")
    _check_port(text, port, format_hostport(str(ip), 8443))
    return str(ip), int(port)


def _check_port(text: str, port: str, example: str) -> None:
    """A port is 1..65535 in ASCII digits; the message shows the right form."""
    if not (port.isascii() and port.isdigit()):
        raise ValueError(
            f"invalid address {text!r}: port {port!r} is not a number: port must be 1..65535, "
            f"such as {example!r}"
        )
    if not 1 <= int(port) <= 65535:
        raise ValueError(
            f"invalid address {text!r}: port {int(port)} is out of range: port must be "
            f"1..65535, such as {example!r}"
        )


SRV_PREFIX = "srv+"
"""How a backend ``address`` names an SRV record: ``srv+_https._tcp.app.internal``."""

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")
_SRV_NAME = re.compile(
    rf"^(?=.{{1,253}}$)_[A-Za-z0-9]([A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?\._(tcp|udp|[A-Za-z0-9-]+)"
    rf"(\.{_LABEL})+\.?$"
)


class AddressKind(enum.Enum):
    """What a backend ``address`` names: an IP, a DNS name (A/AAAA), or an SRV record."""

    IP = "ip"
    NAME = "name"
    SRV = "srv"


@dataclass(frozen=True, slots=True)
class BackendAddress:
    """A parsed backend ``address``: ``host`` is the IP or DNS name; ``port`` is 0 for SRV
    (the record gives it)."""

    kind: AddressKind
    host: str
    port: int

    @property
    def dynamic(self) -> bool:
        """True when DNS decides the addresses (a name or an SRV record)."""
        return self.kind is not AddressKind.IP


def parse_backend_address(text: str) -> BackendAddress:
    """A backend's ``address``: ``IP:PORT``, ``[IPv6]:PORT``, ``NAME:PORT`` (A and AAAA
    records, the port as written), or ``srv+_SERVICE._PROTO.NAME`` (an SRV record: port and
    weight from it). Checks the form only; nothing is resolved here."""
    if text.startswith(SRV_PREFIX):
        name = text[len(SRV_PREFIX) :]
        if not _SRV_NAME.match(name):
            raise ValueError(
                f"invalid SRV address {text!r}: expected 'srv+_SERVICE._PROTO.NAME' such as "
                "'srv+_https._tcp.app.internal' (the record gives port and weight: no ':PORT')"
            )
        return BackendAddress(AddressKind.SRV, name.rstrip(".").lower(), 0)
    host, sep, port = text.rpartition(":")
    if sep and not text.startswith("[") and ":" not in host and host and not _is_ip_text(host):
        if not _HOSTNAME.match(host):
            raise ValueError(
                f"invalid address {text!r}: {host!r} is neither an IP address nor a DNS name "
                "(letters, digits and '-' in dot-separated labels of at most 63 characters); "
                "expected IP:PORT, NAME:PORT such as 'app.internal:8443', or "
                "'srv+_https._tcp.app.internal'"
            )
        _check_port(text, port, f"{host}:8443")
        return BackendAddress(AddressKind.NAME, host.rstrip(".").lower(), int(port))
    if not sep:
        raise ValueError(
            f"invalid address {text!r}: missing port; expected IP:PORT, NAME:PORT such as "
            "'app.internal:8443', or 'srv+_https._tcp.app.internal' (an SRV record)"
        )
    try:
        ip, number = parse_hostport(text)
    except ValueError as err:
        message = str(err).replace(" (hostnames are not resolved)", "")
        raise ValueError(message) from None
    return BackendAddress(AddressKind.IP, ip, number)


def _is_ip_text(host: str) -> bool:
    """True when ``host`` looks like an IPv4 literal (digits and dots): parse_hostport judges it."""
    return all(part.isdigit() for part in host.split(".")) or "%" in host


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


HTTP_PATH = re.compile(r"^/[\x21-\x7e]*$")


def parse_http_path(text: str) -> str:
    """A health check's ``http_path``: ``/`` then visible ASCII only.

    A CR or LF would end the request line and inject headers into every check; a space would
    split the request line; non-ASCII must be percent-encoded in a request target anyway.
    """
    if not HTTP_PATH.match(text):
        raise ValueError(
            f"invalid path {text!r}: expected a path starting with '/' with no spaces, control "
            "characters (CR/LF would inject headers into the check request) or non-ASCII "
            "(percent-encode them, e.g. %20)"
        )
    return text


def parse_token(text: str) -> str:
    """``[admin] token``: one or more visible ASCII characters (what a Bearer header can carry).

    An empty token used to switch authentication off without a word; leave the key out for no
    token, so the choice is visible in the file.
    """
    if not text or not all(0x21 <= ord(c) <= 0x7E for c in text):
        raise ValueError(
            "invalid token: expected one or more visible ASCII characters, without spaces "
            "(an empty token would disable authentication: remove the key for no token)"
        )
    return text


MAX_RATE = 1_000_000.0
"""The highest per-client rate, per second: far above what one client can open (a loopback
client manages some tens of thousands a second), and finite (400 nines are infinity to a float)."""


def parse_rate(text: str) -> float:
    """``"50/s"``, ``"100/m"``, ``"10/h"`` -> events per second (> 0, at most :data:`MAX_RATE`)."""
    m = _RATE.match(text)
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(
            f"invalid rate {text!r}: expected a positive count per unit, such as '50/s', '100/m'"
        )
    rate = float(m.group(1)) / _UNIT_SECONDS[m.group(2)]
    if not rate <= MAX_RATE:
        raise ValueError(f"invalid rate {text!r}: at most '1000000/s' (leave the key out for none)")
    return rate


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


def parse_status_ranges(text: str) -> tuple[tuple[int, int], ...]:
    """``"200-399"``, ``"200,204"``, ``"200,300-399"`` -> ``((low, high), ...)`` (100..599)."""
    out = []
    for part in text.split(","):
        low_text, dash, high_text = part.strip().partition("-")
        if not _digits(low_text) or (dash and not _digits(high_text)):
            raise ValueError(
                f"invalid status list {text!r}: expected statuses or ranges such as "
                "'200', '200-399' or '200,204,300-399'"
            )
        low = int(low_text)
        high = int(high_text) if dash else low
        if not 100 <= low <= high <= 599:
            raise ValueError(f"invalid status range {part.strip()!r}: 100 <= low <= high <= 599")
        out.append((low, high))
    return tuple(out)


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()
