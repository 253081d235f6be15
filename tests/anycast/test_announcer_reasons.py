"""Why a VIP is announced or not, read from a real balancer: listeners bound, pools with a
backend that passed ``rise`` checks since start, draining. The speaker child is a stand-in
process (the reasons are l4lb's own decision; tests/fleet runs the real ExaBGP)."""

from __future__ import annotations

import asyncio
import sys
import time

import msgspec

from l4lb.anycast.announcer import Announcer
from l4lb.anycast.exabgp import ExaBgp
from l4lb.anycast.state import VipReason
from l4lb.balancer import health
from l4lb.balancer.runtime import Balancer
from l4lb.config import parse_config
from l4lb.config.anycast import AnycastConfig
from tests.support.echo_backend import EchoBackend
from tests.support.peers import free_port

VIP = "127.0.0.1/32"
ANYCAST = msgspec.convert(
    {
        "vips": [VIP],
        "local_as": 65010,
        "router_id": "203.0.113.2",
        "neighbors": [{"address": "203.0.113.1", "remote_as": 65000}],
        "second_chance": False,
        "withdraw_grace": "100ms",
    },
    AnycastConfig,
)


async def _until(announcer: Announcer, reason: VipReason, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while announcer.reasons[VIP] is not reason:
        assert time.monotonic() < deadline, (announcer.reasons[VIP], reason)
        await asyncio.sleep(0.02)


def test_reasons_follow_listeners_health_and_drain() -> None:
    port = free_port()
    backend = EchoBackend("a", port=port)

    async def scenario() -> None:
        config = parse_config(
            f"""
workers = 1
[log]
access = "off"
[[listeners]]
name = "web"
bind = "127.0.0.1:{free_port()}"
pool = "web"
[pools.web]
backends = [{{ address = "127.0.0.1:{port}" }}]
[pools.web.health]
interval = "100ms"
rise = 2
fall = 1
"""
        )
        balancer = Balancer(config, None, asyncio.get_running_loop())
        speaker = ExaBgp(ANYCAST, command=[sys.executable, "-c", "import time; time.sleep(60)"])
        announcer = Announcer(ANYCAST, speaker, None)
        await announcer.start(balancer)  # before the listeners are bound
        try:
            assert announcer.reason(VIP) is VipReason.NOT_BOUND
            balancer.start()
            health.attach(balancer)
            # bound, the backend not yet checked `rise` times (it is not even listening)
            assert announcer.reason(VIP) is VipReason.STARTING
            await _until(announcer, VipReason.NO_BACKEND)  # fall = 1: down
            assert not speaker.routes
            backend.start()
            await _until(announcer, VipReason.SERVING)
            assert speaker.routes == {VIP}
            backend.stop()
            await _until(announcer, VipReason.NO_BACKEND)
            assert not speaker.routes
            backend.start()
            await _until(announcer, VipReason.SERVING)
            assert announcer.begin_drain() == [VIP]  # POST /drain's call
            assert announcer.reasons[VIP] is VipReason.DRAINING and not speaker.routes
            assert balancer.listeners["web"].accepting  # withdrawn first, still accepting
            await announcer.drain()  # SIGTERM's: the rest of withdraw_grace
            assert announcer.reasons[VIP] is VipReason.DRAINING and not speaker.routes
            assert announcer.status().vips[0].announced is False
        finally:
            await announcer.close()
            await balancer.stop(timeout=0)
            backend.stop()

    asyncio.run(scenario())
