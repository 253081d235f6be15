"""The anycast fleet, end to end (issue 17): a BIRD 2 router spreading a VIP over l4lb nodes with
ECMP, each node announcing it through its own ExaBGP, an nginx backend logging the real client.

One test walks the fleet's life: three nodes share new connections; one drains (0 failed new
connections, 0 resets of its long-lived connections, which second chance keeps alive after the
route moved); it returns and a fourth node joins (0 resets of the others' connections); one is
killed with SIGKILL (its route goes, new connections recover). The figures are printed at the end
(run with ``-s`` to see them) and written to ``$L4LB_FLEET_REPORT`` when set.

Needs root (network namespaces, nftables); CI runs as root, so it runs there.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

from tests.fleet.clients import LongLived, NewConnections
from tests.fleet.topology import CLIENTS, Fleet, fleet_addr, node_addr
from tests.support.logs import wait_line
from tests.support.netns import needs_root
from tests.support.peers import wait_for

pytestmark = needs_root


def _node_of(fleet: Fleet, sources: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """(client, client port) -> node index, from the backend's log, once every one of
    ``sources`` is in it (nginx writes a request's line after its response: the client may have
    read the answer first)."""
    by_addr = {fleet_addr(i): i for i in range(1, 5)}
    found: dict[tuple[str, int], int] = {}

    def complete() -> bool:
        found.clear()
        found.update({(f[0], int(f[1])): by_addr[f[2]] for f in fleet.backend_lines()})
        return all(s in found for s in sources)

    assert wait_for(complete, 10), [s for s in sources if s not in found]
    return found


def _wait_up(fleet: Fleet, i: int) -> None:
    node = fleet.nodes[i]
    ok = wait_for(lambda: "event=vip_announced" in node.log.read_text(), 30)
    assert ok, node.log.read_text()[-3000:]


def _counters(fleet: Fleet, i: int) -> dict[str, int]:
    doc = fleet.status(i)["anycast"]
    assert isinstance(doc, dict)
    sc = doc["second_chance"]
    assert isinstance(sc, dict)
    return {k: int(v) for k, v in sc.items()}


def _flows(long: LongLived, during: NewConnections) -> dict[str, int]:
    """What a change of the fleet did to the long-lived connections and the new ones."""
    return {
        "long_lived_total": len(long.socks),
        "resets": sum(1 for f in long.failures if f.kind == "reset"),
        "long_lived_failures": len(long.failures),
        "requests": long.requests,
        "new_connections_ok": during.ok,
        "new_connections_failed": len(during.failures),
    }


def test_fleet_spreads_drains_returns_grows_and_survives_sigkill(fleet: Fleet) -> None:
    report: dict[str, object] = {}
    t0 = time.monotonic()
    hops = {node_addr(i) for i in (1, 2, 3)}
    for i in (1, 2, 3):
        fleet.start_node(i)
    for i in (1, 2, 3):
        _wait_up(fleet, i)
    fleet.wait_nexthops(hops)
    report["startup_seconds"] = round(time.monotonic() - t0, 2)

    # -- new connections spread over the three nodes; the backend sees the real client --------
    spread = NewConnections(fleet)
    for _ in range(90):
        spread.one()
    assert not spread.failures, spread.failures
    nodes = _node_of(fleet, spread.sources)
    per_node = Counter(nodes[s] for s in spread.sources)
    report["connections_per_node"] = dict(sorted(per_node.items()))
    assert set(per_node) == {1, 2, 3}, per_node
    lines = fleet.backend_lines()
    assert lines and all(f[0] in CLIENTS for f in lines), lines[:5]
    # Maglev: every node picks the same backend for the same client
    backend_of: dict[str, set[str]] = {}
    multi = 0
    for client in {f[0] for f in lines}:
        seen = {f[3] for f in lines if f[0] == client}
        on = {nodes[(f[0], int(f[1]))] for f in lines if f[0] == client}
        backend_of[client] = seen
        multi += len(on) > 1
    assert all(len(v) == 1 for v in backend_of.values()), backend_of
    report["clients_seen_on_several_nodes_same_backend"] = multi
    status = fleet.status(1)["anycast"]
    assert isinstance(status, dict)
    assert status["vips"][0]["announced"] is True
    assert status["vips"][0]["reason"] == "serving"
    assert status["sessions"][0]["state"] == "up"
    assert 'l4lb_anycast_vip_announced{vip="192.0.2.10/32"} 1.0' in fleet.metrics(1)

    # -- graceful withdraw of node 3 ---------------------------------------------------------
    long = LongLived(fleet, 30)
    long.open()
    nodes = _node_of(fleet, long.sources())
    on3 = [s for s in long.sources() if nodes[s] == 3]
    assert on3, "no long-lived connection landed on node 3"
    with NewConnections(fleet) as during:
        long.run(0.5)
        killed = time.monotonic()
        fleet.sigterm(3)
        fleet.wait_nexthops({node_addr(1), node_addr(2)})
        report["withdraw_to_route_change_ms"] = round((time.monotonic() - killed) * 1000, 1)
        long.run(3.0)
    report["withdraw"] = {"long_lived_on_node": len(on3), **_flows(long, during)}
    assert not long.failures, long.failures
    assert not during.failures, during.failures
    assert during.ok > 0
    forwarded = sum(_counters(fleet, i)["forwarded"] for i in (1, 2))
    report["second_chance_forwarded_after_withdraw"] = forwarded
    assert forwarded > 0, "node 3's flows moved, yet no segment was handed on"
    long.close()
    node3 = fleet.nodes[3].proc
    assert node3 is not None
    node3.wait(30)
    assert node3.returncode == 0, fleet.nodes[3].log.read_text()[-3000:]
    log3 = fleet.nodes[3].log.read_text()
    assert log3.index("event=vip_withdrawn") < log3.index("event=stopping"), log3[-3000:]

    # -- node 3 returns, node 4 joins: the others' connections stay -------------------------
    long = LongLived(fleet, 30)
    long.open()
    with NewConnections(fleet) as during:
        long.run(0.5)
        fleet.start_node(3)
        _wait_up(fleet, 3)
        fleet.wait_nexthops({node_addr(i) for i in (1, 2, 3)})
        long.run(1.5)
        fleet.start_node(4)
        _wait_up(fleet, 4)
        fleet.wait_nexthops({node_addr(i) for i in (1, 2, 3, 4)})
        long.run(2.0)
    report["return_and_addition"] = _flows(long, during)
    assert not long.failures, long.failures
    assert not during.failures, during.failures
    taken = {i: _counters(fleet, i) for i in (1, 2, 3, 4)}
    report["second_chance_after_return_and_addition"] = taken
    assert sum(c["forwarded"] for c in (taken[3], taken[4])) > 0, taken
    long.close()

    # -- SIGKILL of node 4: its route goes with it, new connections recover ------------------
    with NewConnections(fleet) as during:
        time.sleep(0.5)
        killed = time.monotonic()
        fleet.sigkill(4)
        fleet.wait_nexthops({node_addr(i) for i in (1, 2, 3)})
        route_gone = time.monotonic()
        time.sleep(1.0)
    after = [f for f in during.failures if f.at > route_gone + 0.2]
    last = max((f.at for f in during.failures), default=killed)
    report["sigkill"] = {
        "route_gone_ms": round((route_gone - killed) * 1000, 1),
        "new_connections_failed": len(during.failures),
        "recovered_after_ms": round(max(0.0, last - killed) * 1000, 1),
        "new_connections_ok": during.ok,
    }
    assert not after, after
    pids = fleet.nodes[4].ns.pids()
    assert wait_for(lambda: not fleet.nodes[4].ns.pids(), 10), (
        f"processes left in node 4 after SIGKILL of l4lb: {pids}"
    )
    report["total_seconds"] = round(time.monotonic() - t0, 1)
    text = json.dumps(report, indent=2)
    print("\nfleet report:\n" + text)
    target = os.environ.get("L4LB_FLEET_REPORT")
    if target:
        Path(target).write_text(text + "\n")
    wait_line(fleet.nodes[1].log, "event=second_chance_installed")
