"""The admin API across workers: snapshots add up, actions and reloads reach every worker.

Each "worker" here is a real AdminServer on its own abstract Unix socket (named as the
workers of one supervisor would be), with an in-memory control standing in for its balancer;
tests/observe/test_admin_workers.py runs the same with a real ``l4lb run`` and two workers.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict

from l4lb.observe import cluster
from l4lb.observe.admin import AdminServer
from l4lb.observe.control import ClusterControl, ReloadOutcome
from l4lb.observe.snapshot import Snapshot, merge
from tests.observe.test_admin_unit import MemoryControl


class Worker(MemoryControl):
    def __init__(self, reload_errors: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.reload_errors = reload_errors

    async def reload(self) -> ReloadOutcome:
        if self.reload_errors:
            return ReloadOutcome(False, self.reload_errors)
        self.reloads += 1
        return ReloadOutcome(True, summary="ok")


def test_snapshot_round_trip_and_merge() -> None:
    one = MemoryControl().snapshot()
    again = Snapshot.from_dict(json.loads(json.dumps(one.to_dict())))
    # the hand-written form is the dataclass, field by field
    assert json.loads(json.dumps(one.to_dict())) == json.loads(json.dumps(asdict(one)))
    assert again == one
    both = merge(one, [again])
    assert both.workers == 2
    assert both.listeners[0].total == 2 * one.listeners[0].total
    assert both.listeners[0].rejections["untrusted"] == 6
    b0, b1 = both.pools[0].backends[0], one.pools[0].backends[0]
    assert (b0.total, b0.bytes_out, b0.connect_failures) == (14, 4000, 2)
    assert b0.state == b1.state and b0.check == b1.check
    assert b0.connect_latency is not None and b0.connect_latency.counts == (6, 8, 0)
    assert both.proxy_header_errors == {"bad_signature": 4}


def test_cluster_control_fans_out() -> None:
    supervisor = 1_000_000 + os.getpid()  # a prefix no real balancer on this host uses

    async def main() -> None:
        me, other, broken = Worker(), Worker(), Worker(("pools.web: bad",))
        servers = []
        for pid, control in ((1, me), (2, other)):
            server = AdminServer(control, unix=cluster.socket_name(supervisor, pid))
            await server.start()
            servers.append(server)
        try:
            assert cluster.peer_sockets(supervisor, 1) == [cluster.socket_name(supervisor, 2)]
            ctl = ClusterControl(me, supervisor, 1)  # type: ignore[arg-type]
            snap = await ctl.snapshot()
            assert snap.workers == 2 and snap.listeners[0].total == 28

            state = await ctl.backend_action("web", "[::1]:9002", "drain")
            assert state == "drain"
            assert other.states[("web", "[::1]:9002")] == "drain"  # reached the other worker

            outcome = await ctl.reload()
            assert outcome.ok and me.reloads == 1 and other.reloads == 1

            # a worker that refuses the reload is reported by pid
            third = AdminServer(broken, unix=cluster.socket_name(supervisor, 3))
            await third.start()
            servers.append(third)
            outcome = await ctl.reload()
            assert not outcome.ok and outcome.errors == ("worker 3: pools.web: bad",)
        finally:
            for server in servers:
                await server.aclose()

    asyncio.run(main())
