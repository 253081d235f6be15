"""Second chance: a mid-flow segment for a flow this node never saw goes to the node that owns it.

When the routers' ECMP set changes (a node withdraws, returns or joins), some established flows
hash to another node. That node has no socket for them, and its kernel would answer their
next segment with a RST. Second chance stops that with the kernel's own machinery (nftables,
conntrack, a VXLAN device; no packet passes through Python), for any number of nodes:

1. a segment to a VIP port that is not a SYN and that conntrack does not know
   (``ct state invalid``, with ``nf_conntrack_tcp_loose = 0`` so an ACK never starts a flow) is
   copied once (``dup``) into the VXLAN device ``l4lbsc``, and dropped here: no RST. The
   device floods it to every peer (head-end replication: one ``all-zeros`` FDB entry per peer);
2. a copy that arrives on ``l4lbsc`` for a flow this node knows (``established``) is taken:
   the local socket gets it, and answers the client directly;
3. a copy for a flow this node does not know either is dropped silently, and never copied on.

Copies travel inside VXLAN (UDP 4789 between the nodes' own addresses), so a peer that is not
running l4lb (no ``l4lbsc`` device) never sees them as TCP segments and cannot reset the flow:
the UDP datagram is refused at worst. The copy's frame goes to the broadcast MAC (each
``l4lbsc`` keeps its own MAC: VXLAN drops frames that carry its own address as source), and
the receiver's rule marks it as addressed to the host, as TCP requires.

The owner answers with the VIP as source through its own route to the client, so routers and
nodes need loose reverse-path filtering (docs/scale-out.md). :meth:`SecondChance.install`
creates the device and replaces the table atomically; :meth:`SecondChance.remove` deletes both.
Counters are named nftables counters.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("l4lb.anycast")

TABLE = "l4lb_second_chance"
DEVICE = "l4lbsc"
BROADCAST = "ff:ff:ff:ff:ff:ff"
NEXT_HOP = "169.254.41.17"
"""A link-local key for the copies' neighbour entry on ``l4lbsc`` (no packet is addressed to it)."""
DEVICE_ADDRESS = "169.254.41.1/32"
"""Reverse-path filtering refuses every packet arriving on a device without an IPv4 address
(loose mode included); the copies' device gets this one (the same on every node, never a
source: the owner answers through its route to the client)."""
VXLAN_PORT = 4789
COUNTERS = ("forwarded", "taken", "dropped")
LOOSE_SYSCTL = Path("/proc/sys/net/netfilter/nf_conntrack_tcp_loose")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class SecondChanceError(Exception):
    """The rules could not be installed (nft missing or refused them); the message says why."""


@dataclass(frozen=True, slots=True)
class Counters:
    """Segments seen by the rules since they were installed."""

    forwarded: int = 0
    """Unknown mid-flow segments copied to the peers (each counted once, not once per peer)."""
    taken: int = 0
    """Peers' copies of flows this node owns: delivered to the local socket."""
    dropped: int = 0
    """Peers' copies of flows this node does not own either: dropped without a RST."""


def _source_toward(peer: Address) -> str | None:
    """This node's address on the way to ``peer`` (the VXLAN's local address)."""
    try:
        out = subprocess.run(
            ["ip", "-j", "route", "get", str(peer)],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
        routes = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if routes and isinstance(routes[0], dict):
        src = routes[0].get("prefsrc")
        return str(src) if src else None
    return None


def render_rules(vips: Sequence[Address], ports: Sequence[int]) -> str:
    """The ``nft -f`` text for these (IPv4) VIPs and listening ports."""
    v4 = [str(v) for v in vips if v.version == 4]
    text = [f"table ip {TABLE} {{}}", f"delete table ip {TABLE}"]
    if not v4 or not ports:
        return "\n".join(text) + "\n"
    match = (
        f"ip daddr {{ {', '.join(v4)} }} "
        f"tcp dport {{ {', '.join(str(p) for p in sorted(set(ports)))} }}"
    )
    text += [
        f"table ip {TABLE} {{",
        *(f"    counter {name} {{}}" for name in COUNTERS),
        "    chain prerouting {",
        # after conntrack (-200), before the routing decision
        "        type filter hook prerouting priority mangle; policy accept;",
        f'        iifname "{DEVICE}" ct state invalid counter name "dropped" drop',
        # sent to the broadcast MAC (each l4lbsc has its own MAC: VXLAN drops frames from its
        # own address); TCP takes only packets addressed to the host
        f'        iifname "{DEVICE}" meta pkttype set host counter name "taken" accept',
        f"        {match} tcp flags & syn == 0 ct state invalid "
        f'counter name "forwarded" dup to {NEXT_HOP} device "{DEVICE}" drop',
        "    }",
        "}",
    ]
    return "\n".join(text) + "\n"


class SecondChance:
    """The rules of one node: :meth:`install` at start, :meth:`remove` at stop."""

    def __init__(
        self, vips: list[Address], ports: list[int], peers: list[Address], vni: int
    ) -> None:
        self.vips = [v for v in vips if v.version == 4]
        self.ports = ports
        self.peers = [p for p in peers if p.version == 4]
        self.vni = vni
        self.installed = False

    def install(self) -> None:
        """Create ``l4lbsc``, load the rules, set ``nf_conntrack_tcp_loose = 0``.

        Raises :class:`SecondChanceError` naming the step that failed.
        """
        local = _source_toward(self.peers[0]) if self.peers else None
        self._cmd(["ip", "link", "del", DEVICE], check=False)
        self.installed = True
        link = ["ip", "link", "add", DEVICE, "type", "vxlan"]
        link += ["id", str(self.vni), "dstport", str(VXLAN_PORT), "nolearning"]
        if local is not None:
            link += ["local", local]
        self._cmd(link)
        for peer in self.peers:
            self._cmd(["bridge", "fdb", "append", "00:00:00:00:00:00", "dev", DEVICE,
                       "dst", str(peer)])  # fmt: skip
        self._cmd(["ip", "addr", "add", DEVICE_ADDRESS, "dev", DEVICE, "scope", "link"])
        self._cmd(["ip", "link", "set", "dev", DEVICE, "up"])
        self._cmd(["ip", "neigh", "replace", NEXT_HOP, "lladdr", BROADCAST, "dev", DEVICE,
                   "nud", "permanent"])  # fmt: skip
        self._cmd(["ip", "route", "replace", f"{NEXT_HOP}/32", "dev", DEVICE])
        self._cmd(["nft", "-f", "-"], render_rules(self.vips, self.ports))
        for path, value in (
            (LOOSE_SYSCTL, "0"),
            (Path(f"/proc/sys/net/ipv4/conf/{DEVICE}/rp_filter"), "2"),
        ):
            try:
                path.write_text(value + "\n")
            except OSError as err:
                raise SecondChanceError(
                    f"cannot set {path} to {value} ({err.strerror}): second chance needs it"
                ) from err
        log.info(
            "event=second_chance_installed vips=%s ports=%s peers=%s local=%s",
            ",".join(str(v) for v in self.vips),
            ",".join(str(p) for p in self.ports),
            ",".join(str(p) for p in self.peers) or "-",
            local or "-",
        )

    def set_ports(self, ports: list[int]) -> None:
        """The listeners' ports changed (a reload): replace the rules (one atomic nft load)."""
        if sorted(set(ports)) == sorted(set(self.ports)):
            return
        self.ports = ports
        if self.installed:
            self._cmd(["nft", "-f", "-"], render_rules(self.vips, self.ports))
            log.info("event=second_chance_updated ports=%s", ",".join(str(p) for p in ports))

    def remove(self) -> None:
        """Delete the rules (nothing left in the namespace); errors are logged, not raised."""
        if not self.installed:
            return
        self.installed = False
        for args in (["nft", "delete", "table", "ip", TABLE], ["ip", "link", "del", DEVICE]):
            try:
                self._cmd(args)
            except SecondChanceError as err:
                log.error("event=second_chance_remove_failed error=%r", str(err))
        log.info("event=second_chance_removed")

    def counters(self) -> Counters:
        """The counters, summed over the address families (zeros when not installed)."""
        if not self.installed:
            return Counters()
        totals = dict.fromkeys(COUNTERS, 0)
        try:
            out = self._cmd(["nft", "-j", "list", "counters", "table", "ip", TABLE])
            doc = json.loads(out)
        except (SecondChanceError, ValueError):
            return Counters()
        for item in doc.get("nftables", []):
            counter = item.get("counter") if isinstance(item, dict) else None
            if isinstance(counter, dict) and counter.get("name") in totals:
                totals[counter["name"]] += int(counter.get("packets", 0))
        return Counters(**totals)

    @staticmethod
    def _cmd(args: list[str], stdin: str | None = None, check: bool = True) -> str:
        try:
            done = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError) as err:
            raise SecondChanceError(f"cannot run {args[0]}: {err}") from err
        if check and done.returncode != 0:
            raise SecondChanceError(f"{' '.join(args)}: {done.stderr.strip()}")
        return done.stdout
