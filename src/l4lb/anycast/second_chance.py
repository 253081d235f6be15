"""Second chance: a mid-flow segment for a flow this node never saw goes to the node that owns it.

When the routers' ECMP set changes (a node withdraws, returns or joins), some established flows
hash to another node. That node has no socket for them, and its kernel would answer their
next segment with a RST. Second chance stops that with the kernel's own machinery (nftables and
conntrack; no packet passes through Python), for any number of nodes:

1. a segment to a VIP port that is not a SYN and that conntrack does not know
   (``ct state invalid``, with ``nf_conntrack_tcp_loose = 0`` so an ACK never starts a flow) is
   marked (DSCP ``cs5``), copied to every peer (``dup to PEER``) and dropped here: no RST;
2. a peer's copy (the mark) that this node knows (``established``) is unmarked and taken;
3. a peer's copy this node does not know either is dropped silently: it is never copied on,
   so a segment crosses the fleet link at most once per peer.

The owner answers the client directly (source the VIP, through its own route to the client),
so routers and nodes need loose reverse-path filtering (docs/scale-out.md). The rules live in
one table per address family (``l4lb_second_chance``) in this network namespace; :meth:`install`
replaces it atomically, :meth:`remove` deletes it. Counters are named nftables counters.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("l4lb.anycast")

TABLE = "l4lb_second_chance"
MARK_DSCP = "cs5"
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


def _device_toward(peer: Address) -> str | None:
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
        dev = routes[0].get("dev")
        return str(dev) if dev else None
    return None


def render_rules(
    vips: list[Address], ports: list[int], peers: list[tuple[Address, str | None]]
) -> str:
    """The ``nft -f`` text for these VIPs, listening ports and peers (with their devices)."""
    text: list[str] = []
    for family, version in (("ip", 4), ("ip6", 6)):
        fam_vips = [str(v) for v in vips if v.version == version]
        fam_peers = [(p, dev) for p, dev in peers if p.version == version]
        if not fam_vips or not ports:
            continue
        match = (
            f"{family} daddr {{ {', '.join(fam_vips)} }} "
            f"tcp dport {{ {', '.join(str(p) for p in sorted(set(ports)))} }}"
        )
        dups = " ".join(
            f'dup to {p} device "{dev}"' if dev else f"dup to {p}" for p, dev in fam_peers
        )
        text += [
            f"table {family} {TABLE} {{}}",
            f"delete table {family} {TABLE}",
            f"table {family} {TABLE} {{",
            *(f"    counter {name} {{}}" for name in COUNTERS),
            "    chain prerouting {",
            # after conntrack (-200), before the routing decision
            "        type filter hook prerouting priority mangle; policy accept;",
            f"        {match} {family} dscp {MARK_DSCP} ct state invalid "
            'counter name "dropped" drop',
            f"        {match} {family} dscp {MARK_DSCP} "
            f'counter name "taken" {family} dscp set cs0 accept',
            f"        {match} tcp flags & syn == 0 ct state invalid "
            f'counter name "forwarded" {family} dscp set {MARK_DSCP} {dups} drop',
            "    }",
            "}",
        ]
    return "\n".join(text) + "\n"


class SecondChance:
    """The rules of one node: :meth:`install` at start (and reload), :meth:`remove` at stop."""

    def __init__(self, vips: list[Address], ports: list[int], peers: list[Address]) -> None:
        self.vips = vips
        self.ports = ports
        self.peers = peers
        self.installed = False
        self.families: list[str] = sorted(
            {"ip" if v.version == 4 else "ip6" for v in vips}, reverse=True
        )

    def install(self) -> None:
        """Set ``nf_conntrack_tcp_loose = 0`` and load the rules; :class:`SecondChanceError`."""
        peers = [(p, _device_toward(p)) for p in self.peers]
        rules = render_rules(self.vips, self.ports, peers)
        self._nft(["-f", "-"], rules)
        self.installed = True
        try:
            LOOSE_SYSCTL.write_text("0\n")
        except OSError as err:
            raise SecondChanceError(
                f"cannot set {LOOSE_SYSCTL} to 0 ({err.strerror}): without it a mid-flow "
                "segment starts a conntrack entry and is never handed to its owner"
            ) from err
        log.info(
            "event=second_chance_installed vips=%s ports=%s peers=%s",
            ",".join(str(v) for v in self.vips),
            ",".join(str(p) for p in self.ports),
            ",".join(f"{p}@{dev}" for p, dev in peers),
        )

    def remove(self) -> None:
        """Delete the rules (nothing left in the namespace); errors are logged, not raised."""
        if not self.installed:
            return
        self.installed = False
        for family in self.families:
            try:
                self._nft(["delete", "table", family, TABLE])
            except SecondChanceError as err:
                log.error("event=second_chance_remove_failed error=%r", str(err))
        log.info("event=second_chance_removed")

    def counters(self) -> Counters:
        """The counters, summed over the address families (zeros when not installed)."""
        if not self.installed:
            return Counters()
        totals = dict.fromkeys(COUNTERS, 0)
        for family in self.families:
            try:
                out = self._nft(["-j", "list", "counters", "table", family, TABLE])
                doc = json.loads(out)
            except (SecondChanceError, ValueError):
                continue
            for item in doc.get("nftables", []):
                counter = item.get("counter") if isinstance(item, dict) else None
                if isinstance(counter, dict) and counter.get("name") in totals:
                    totals[counter["name"]] += int(counter.get("packets", 0))
        return Counters(**totals)

    @staticmethod
    def _nft(args: list[str], stdin: str | None = None) -> str:
        try:
            done = subprocess.run(
                ["nft", *args], input=stdin, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError) as err:
            raise SecondChanceError(f"cannot run nft: {err}") from err
        if done.returncode != 0:
            raise SecondChanceError(f"nft {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout
