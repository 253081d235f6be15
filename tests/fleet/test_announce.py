"""One node behind the BIRD router: the VIP is announced only while a backend is up, and
``POST /drain`` withdraws it before the node stops (issue 17, "announce only what can serve").

Needs root (network namespaces, nftables); CI runs as root, so it runs there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.fleet.topology import Fleet, node_addr
from tests.observe.chromium import _base
from tests.support.logs import wait_line
from tests.support.netns import Namespace, needs_root, sh
from tests.support.peers import wait_for

pytestmark = needs_root


def _pids(ns: Namespace, needle: str) -> list[int]:
    found = []
    for pid in ns.pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in cmdline:
            found.append(int(pid))
    return found


def _vip(fleet: Fleet) -> dict[str, object]:
    doc = fleet.status(1)["anycast"]
    assert isinstance(doc, dict)
    vip = doc["vips"][0]
    assert isinstance(vip, dict)
    return vip


def test_vip_follows_backends_and_drain_withdraws_first(fleet: Fleet) -> None:
    node = fleet.start_node(1)
    fleet.wait_nexthops({node_addr(1)}, 30)
    assert _vip(fleet)["reason"] == "serving"

    down = time.monotonic()
    fleet.stop_backend()
    fleet.wait_nexthops(set())
    withdrawn_after = time.monotonic() - down
    vip = _vip(fleet)
    assert vip["announced"] is False and vip["reason"] == "no_backend_up", vip
    metrics = fleet.metrics(1)
    assert 'l4lb_anycast_vip_announced{vip="192.0.2.10/32"} 0.0' in metrics
    assert 'l4lb_anycast_vip_reason{reason="no_backend_up",vip="192.0.2.10/32"} 1.0' in metrics
    assert 'l4lb_anycast_bgp_session_state{neighbor="203.0.113.1",state="up"} 1.0' in metrics

    fleet.start_backend()
    fleet.wait_nexthops({node_addr(1)})
    assert _vip(fleet)["reason"] == "serving"

    # the API bridge dies: ExaBGP would keep the route with no way to withdraw it, so l4lb
    # stops that ExaBGP and starts another
    (bridge,) = _pids(node.ns, "l4lb.anycast.bridge")
    (exabgp,) = _pids(node.ns, "exabgp server")
    os.kill(bridge, signal.SIGKILL)
    assert wait_for(lambda: not os.path.exists(f"/proc/{exabgp}"), 10)
    assert wait_for(lambda: fleet.status(1)["anycast"]["speaker_restarts"] == 1, 10)
    assert wait_for(lambda: _vip(fleet)["announced"] is True, 10)
    fleet.wait_nexthops({node_addr(1)})
    wait_line(node.log, "event=exabgp_api_lost")

    # the status page shows the same (Chromium inside the node's namespace)
    args = [*_base(fleet.workdir / "chromium"), "--virtual-time-budget=3000", "--dump-dom"]
    page = subprocess.run(
        node.ns.exec_args([*args, "http://127.0.0.1:9100/"]),
        capture_output=True, text=True, timeout=90, check=True,
    ).stdout  # fmt: skip
    assert '<tr data-vip="192.0.2.10/32" class="">' in page, page[-3000:]
    assert '<span class="state up">announced</span>' in page and "serving" in page
    assert '<tr data-neighbor="203.0.113.1" class="">' in page
    assert "restarts 1" in page and "second chance: forwarded 0" in page

    # a reload that adds a listener port: second chance follows it
    conf = fleet.workdir / "node1.toml"
    conf.write_text(
        conf.read_text() + '\n[[listeners]]\nname = "alt"\nbind = "0.0.0.0:81"\npool = "web"\n'
    )
    status, doc = fleet.admin(1, "POST", "/reload")
    assert status == 200, doc
    rules = sh(*node.ns.exec_args(["nft", "list", "table", "ip", "l4lb_second_chance"]))
    assert "tcp dport { 80, 81 }" in rules, rules

    status, doc = fleet.admin(1, "POST", "/drain")
    assert status == 200 and doc == {"draining": True, "withdrawn": ["192.0.2.10/32"]}, doc
    fleet.wait_nexthops(set())
    assert node.proc is not None
    assert node.proc.wait(30) == 0
    log = node.log.read_text()
    assert log.index("event=vip_withdrawn") < log.index("event=stopping"), log[-2000:]
    assert wait_for(lambda: not node.ns.pids(), 10)
    # second chance is gone with it: no table, no VXLAN device
    rules = sh(*node.ns.exec_args(["nft", "list", "tables"]))
    assert "l4lb_second_chance" not in rules, rules
    assert "l4lbsc" not in node.ns.ip("-o", "link", "show")
    print(f"\nlast backend down -> route withdrawn: {withdrawn_after * 1000:.0f} ms")
