"""The runtime model: backend state, counters across reloads, hooks for health and admin."""

from __future__ import annotations

import bisect

import pytest

from l4lb.balancer.pool import CONNECT_BUCKETS, BackendState, Pool
from l4lb.config.schema import BackendConfig, PoolConfig


def pool_config(*addresses: str, **kw: object) -> PoolConfig:
    backends = tuple(BackendConfig(address=a) for a in addresses)
    return PoolConfig(backends=backends, **kw)  # type: ignore[arg-type]


def test_reload_keeps_backend_objects_state_and_counters() -> None:
    old = Pool("web", pool_config("127.0.0.1:1", "127.0.0.1:2", send_proxy="v2"))
    a, b = old.backends
    a.active, a.total = 3, 10
    old.set_admin(b, "drain")
    new_config = pool_config("127.0.0.1:2", "127.0.0.1:3", send_proxy="v1", balance="leastconn")
    new = Pool("web", new_config, previous=old)
    assert b.proxy_version == 2  # staged: the running pool's backend is untouched until the swap
    new.reconcile(old, keep_api=False)  # the reload put in force (the runtime's swap)
    b2, c = new.backends
    assert b2 is b and b2.state is BackendState.DRAIN and b2.proxy_version == 1
    assert c.state is BackendState.UP and c.total == 0
    assert new.pick("10.0.0.1") is c  # b drains
    assert a.active == 3  # the removed backend's connections keep counting on their object


@pytest.mark.parametrize(
    "seconds", [0.0, 0.0001, 0.0005, 0.00051, 0.002, 0.01, 0.0999, 0.1, 0.7, 1.0, 1.5, 60.0]
)
def test_connect_latency_lands_in_the_bucket_of_its_upper_bound(seconds: float) -> None:
    """A connect of ``seconds`` counts in the first bucket whose bound is >= it (bisect_left),
    bounds included; past the last bound, in the extra last bucket."""
    (b,) = Pool("web", pool_config("127.0.0.1:1")).backends
    b.connected(seconds)
    expected = [0] * (len(CONNECT_BUCKETS) + 1)
    expected[bisect.bisect_left(CONNECT_BUCKETS, seconds)] = 1
    assert b.latency_counts == expected
    assert b.latency_sum == seconds and b.total == 1


def test_hooks_and_counters() -> None:
    pool = Pool("web", pool_config("127.0.0.1:1"))
    (b,) = pool.backends
    changes: list[tuple[str, str]] = []
    results: list[tuple[str, bool, str]] = []
    pool.on_change.append(lambda p, be: changes.append((p.name, be.state.value)))
    pool.on_connect_result = lambda be, ok, detail: results.append((be.address, ok, detail))
    pool.connect_result(b, False, "refused")
    pool.connect_result(b, False, "refused")
    assert b.connect_failures == 2
    b.connected(0.002)
    pool.connect_result(b, True)
    assert b.connect_failures == 2 and b.total == 1
    assert sum(b.latency_counts) == 1 and len(b.latency_counts) == len(CONNECT_BUCKETS) + 1
    assert results == [("127.0.0.1:1", False, "refused")] * 2 + [("127.0.0.1:1", True, "")]
    pool.set_health(b, False, "timeout")
    assert b.last_check == "timeout"
    pool.set_health(b, True, "ok")
    assert changes == [("web", "down"), ("web", "up")]
    assert pool.backend("127.0.0.1:1") is b
