"""The ``[anycast]`` table: the VIPs this node announces over BGP, and to whom.

The schema types only the shape (strings, AS-number ranges); :func:`check` runs the rules that
need the whole file or the machine (a VIP some listener binds, a VIP on a local interface, a
router id that is an IPv4 address) and returns ``(key path, message)`` pairs the loader reports
next to its own issues.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import TYPE_CHECKING, Annotated

from msgspec import Meta, Struct

from l4lb.config import values

if TYPE_CHECKING:
    from l4lb.config.schema import Config

AsNumber = Annotated[
    int, Meta(ge=1, le=4294967295, description="an AS number from 1 to 4294967295")
]
HoldTime = Annotated[
    int, Meta(ge=3, le=65535, description="a BGP hold time in seconds, from 3 to 65535")
]

Vip = ipaddress.IPv4Network | ipaddress.IPv6Network


class NeighborConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One entry of ``anycast.neighbors``: a router this node speaks BGP to."""

    address: str
    remote_as: AsNumber
    local_address: str | None = None
    """The source of the BGP session; default: the kernel's choice toward ``address``."""


class AnycastConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """``[anycast]``: announce ``vips`` to ``neighbors`` while this node can serve them."""

    vips: Annotated[tuple[str, ...], Meta(min_length=1)]
    local_as: AsNumber
    router_id: str
    neighbors: Annotated[tuple[NeighborConfig, ...], Meta(min_length=1)]
    peers: tuple[str, ...] = ()
    """The other l4lb nodes: where second chance sends segments of flows this node does not own."""
    hold_time: HoldTime = 3
    """BGP hold time offered to the routers: how long a silent node stays announced."""
    withdraw_grace: str = "1s"
    """After a withdraw, listeners keep accepting this long (SYNs the routers sent before
    they converged); established connections are then served for ``drain_timeout``."""
    watchdog: str = "3s"
    """A stuck event loop for this long stops ExaBGP, so the routes go with it."""
    second_chance: bool = True
    """Install the nftables + policy routing rules that pass unknown mid-flow segments on."""
    second_chance_vni: Annotated[
        int, Meta(ge=1, le=16777215, description="a VXLAN id from 1 to 16777215")
    ] = 4117
    """The VXLAN id of the copies between nodes (UDP 4789); the same on every node."""

    @property
    def vip_nets(self) -> tuple[Vip, ...]:
        return tuple(ipaddress.ip_network(v, strict=True) for v in self.vips)

    @property
    def peer_addrs(self) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
        return tuple(ipaddress.ip_address(p) for p in self.peers)

    @property
    def withdraw_grace_s(self) -> float:
        return values.parse_duration(self.withdraw_grace)

    @property
    def watchdog_s(self) -> float:
        return values.parse_duration(self.watchdog)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError as err:
        raise ValueError(f"invalid address {text!r}: expected an IP address") from err


def _is_local(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True when ``ip`` is on one of this machine's interfaces (a bind to it succeeds)."""
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((str(ip), 0))
        except OSError as err:
            if err.errno == errno.EADDRNOTAVAIL:
                return False
            raise
    return True


def _binds(config: Config, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Some listener accepts connections to ``ip``: it binds it, or the wildcard of its family."""
    for lst in config.listeners:
        host = ipaddress.ip_address(lst.bind_addr[0])
        if host == ip:
            return True
        if host.is_unspecified and (host.version == ip.version or host.version == 6):
            return True
    return False


def check(config: Config, *, all_listeners: bool = True) -> list[tuple[str, str]]:
    """The rules of ``[anycast]`` that need the whole file or the machine: (key path, message).

    ``all_listeners`` False: some listener of the file failed to parse, so "no listener binds
    this VIP" cannot be told (the failed one may) and is not said.
    """
    ac = config.anycast
    if ac is None:
        return []
    issues: list[tuple[str, str]] = []
    for i, vip in enumerate(ac.vips):
        where = f"anycast.vips[{i}]"
        try:
            net = ipaddress.ip_network(vip, strict=True)
        except ValueError as err:
            issues.append((where, f"invalid VIP {vip!r}: {err} (expected '192.0.2.10/32')"))
            continue
        if net.num_addresses != 1:
            issues.append(
                (where, f"{vip!r} is not one address: a VIP is a /32 (IPv4) or /128 (IPv6)")
            )
            continue
        ip = net.network_address
        if all_listeners and not _binds(config, ip):
            issues.append(
                (where, f"no listener binds {ip} (bind it, or a wildcard such as 0.0.0.0:PORT)")
            )
        try:
            local = _is_local(ip)
        except OSError as err:
            issues.append((where, f"cannot tell whether {ip} is local: {err.strerror}"))
            continue
        if not local:
            issues.append(
                (
                    where,
                    f"{ip} is on no local interface: add it (ip address add {net} dev lo) "
                    "before starting, or the node would attract traffic it cannot take",
                )
            )
    try:
        rid = ipaddress.ip_address(ac.router_id)
    except ValueError:
        rid = None
    if not isinstance(rid, ipaddress.IPv4Address):
        issues.append(
            ("anycast.router_id", f"invalid router id {ac.router_id!r}: expected an IPv4 address")
        )
    for j, nb in enumerate(ac.neighbors):
        for key in ("address", "local_address"):
            text = getattr(nb, key)
            if text is None:
                continue
            try:
                _ip(text)
            except ValueError as err:
                issues.append((f"anycast.neighbors[{j}].{key}", str(err)))
    seen: set[str] = set()
    for j, nb in enumerate(ac.neighbors):
        if nb.address in seen:
            issues.append((f"anycast.neighbors[{j}].address", f"duplicate neighbor {nb.address}"))
        seen.add(nb.address)
    for k, peer in enumerate(ac.peers):
        try:
            _ip(peer)
        except ValueError as err:
            issues.append((f"anycast.peers[{k}]", str(err)))
    for key in ("withdraw_grace", "watchdog"):
        try:
            seconds = values.parse_duration(getattr(ac, key))
        except ValueError as err:
            issues.append((f"anycast.{key}", str(err)))
            continue
        if key == "watchdog" and seconds < 0.5:
            issues.append(("anycast.watchdog", "must be at least '500ms'"))
    if config.workers != 1:
        issues.append(
            (
                "workers",
                f"[anycast] needs workers = 1 (got {config.workers}): one process announces "
                "the VIPs and knows every pool's state",
            )
        )
    return issues
