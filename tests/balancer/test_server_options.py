"""Server options in the pool: ``backup`` and ``slowstart`` (a clock passed in, no sleeping),
and the keys' validation."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from l4lb.balancer.pool import RAMP_STEP, Backend, Pool
from l4lb.config.loader import ConfigError, parse_config
from l4lb.config.schema import BackendConfig, PoolConfig


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _pool(backends: list[dict[str, Any]], clock: Clock | None = None, **kw: Any) -> Pool:
    configs = tuple(BackendConfig(**b) for b in backends)
    return Pool("p", PoolConfig(backends=configs, **kw), clock=clock or Clock())


def _picks(pool: Pool, n: int, ip: str = "192.0.2.1") -> Counter[str]:
    got: Counter[str] = Counter()
    for i in range(n):
        b = pool.pick(ip if pool.config.balance == "maglev" else f"192.0.2.{i % 250}")
        got[b.address if b is not None else "none"] += 1
    return got


@pytest.mark.parametrize("balance", ["roundrobin", "leastconn", "random2", "maglev"])
def test_backups_only_take_connections_while_no_primary_is_up(balance: str) -> None:
    pool = _pool(
        [
            {"address": "192.0.2.1:80"},
            {"address": "192.0.2.2:80"},
            {"address": "192.0.2.9:80", "backup": True},
        ],
        balance=balance,
    )
    a, b, backup = pool.backends
    assert "192.0.2.9:80" not in _picks(pool, 50)
    pool.set_health(a, False)
    assert set(_picks(pool, 50)) == {"192.0.2.2:80"}  # one primary left: still no backup
    pool.set_admin(b, "drain")
    assert set(_picks(pool, 50)) == {"192.0.2.9:80"}
    pool.set_health(backup, False)
    assert set(_picks(pool, 5)) == {"none"}
    pool.set_health(a, True)
    assert set(_picks(pool, 50)) == {"192.0.2.1:80"}


def test_all_backups_share_the_load_in_order_of_weight() -> None:
    pool = _pool(
        [
            {"address": "192.0.2.1:80"},
            {"address": "192.0.2.8:80", "backup": True, "weight": 1},
            {"address": "192.0.2.9:80", "backup": True, "weight": 3},
        ]
    )
    pool.set_health(pool.backends[0], False)
    assert _picks(pool, 40) == {"192.0.2.8:80": 10, "192.0.2.9:80": 30}


def test_slowstart_is_not_applied_at_start() -> None:
    pool = _pool([{"address": "192.0.2.1:80", "slowstart": "60s", "weight": 10}])
    assert pool.backends[0].eff_weight == 10 and pool.ramp_next is None


@pytest.mark.parametrize("how", ["health", "admin"])
def test_slowstart_ramps_the_weight_linearly_after_coming_back(how: str) -> None:
    clock = Clock()
    pool = _pool(
        [
            {"address": "192.0.2.1:80", "weight": 100},
            {"address": "192.0.2.2:80", "weight": 100, "slowstart": "100s"},
        ],
        clock,
    )
    steady, ramping = pool.backends
    if how == "health":
        pool.set_health(ramping, False)
        pool.set_health(ramping, True)
    else:
        pool.set_admin(ramping, "disable")
        pool.set_admin(ramping, "enable")
    assert ramping.eff_weight == 1  # ~1% at first, never 0
    assert _picks(pool, 101) == {"192.0.2.1:80": 100, "192.0.2.2:80": 1}
    for seconds, weight in [(25, 25), (50, 50), (99.5, 100), (100, 100)]:
        clock.now = 1000.0 + seconds
        pool.pick("192.0.2.1")  # the pick steps the ramp once it is due
        assert ramping.eff_weight == weight, seconds
    assert pool.ramp_next is None  # done: no more steps
    assert steady.eff_weight == 100


def test_slowstart_steps_at_most_every_ramp_step() -> None:
    clock = Clock()
    pool = _pool([{"address": "192.0.2.1:80", "weight": 100, "slowstart": "10s"}], clock)
    backend = pool.backends[0]
    pool.set_health(backend, False)
    pool.set_health(backend, True)
    clock.now += RAMP_STEP / 2
    pool.pick("192.0.2.1")
    assert backend.eff_weight == 1  # not due yet
    clock.now += RAMP_STEP / 2
    pool.pick("192.0.2.1")
    assert backend.eff_weight == 1 + 0  # ceil(100 * 0.1 / 10) = 1
    clock.now += 4.9
    pool.pick("192.0.2.1")
    assert backend.eff_weight == 50


def test_slowstart_under_leastconn_favours_the_warm_backend() -> None:
    clock = Clock()
    pool = _pool(
        [
            {"address": "192.0.2.1:80", "weight": 10},
            {"address": "192.0.2.2:80", "weight": 10, "slowstart": "100s"},
        ],
        clock,
        balance="leastconn",
    )
    cold = pool.backends[1]
    pool.set_health(cold, False)
    pool.set_health(cold, True)
    got: Counter[str] = Counter()
    for _ in range(22):
        b = pool.pick("192.0.2.1")
        assert b is not None
        b.active += 1  # connections stay open: leastconn weighs them by the effective weight
        got[b.address] += 1
    assert got["192.0.2.2:80"] <= 2 and got["192.0.2.1:80"] >= 20


def test_maglev_keeps_its_table_during_a_slowstart() -> None:
    clock = Clock()
    pool = _pool(
        [{"address": f"192.0.2.{i}:80", "slowstart": "100s"} for i in range(1, 4)],
        clock,
        balance="maglev",
    )
    before = {f"198.51.100.{i}": pool.pick(f"198.51.100.{i}") for i in range(1, 200)}
    b = pool.backends[1]
    pool.set_health(b, False)
    pool.set_health(b, True)
    assert b.eff_weight == 1
    after = {ip: pool.pick(ip) for ip in before}
    assert after == before  # every client back on its backend at once


def test_backend_options_in_the_config() -> None:
    text = """
[[listeners]]
name = "main"
bind = "127.0.0.1:8443"
pool = "main"

[pools.main]
tcp_keepalive = "60s"
tcp_keepalive_interval = "5s"
tcp_keepalive_count = 4
client_timeout = "30s"
server_timeout = "2m"
backends = [
  { address = "127.0.0.1:9001", slowstart = "30s" },
  { address = "127.0.0.1:9002", backup = true },
]
"""
    config = parse_config(text)
    pool = config.pools["main"]
    assert pool.keepalive == (60, 5, 4)
    assert (pool.client_timeout_s, pool.server_timeout_s) == (30.0, 120.0)
    assert pool.backends[0].slowstart_s == 30.0 and pool.backends[1].backup
    for good, bad in [
        ('tcp_keepalive = "60s"', 'tcp_keepalive = "0s"'),
        ("tcp_keepalive_count = 4", "tcp_keepalive_count = 0"),
        ('client_timeout = "30s"', 'client_timeout = "1ms"'),
        ('server_timeout = "2m"', 'server_timeout = "soon"'),
        ('slowstart = "30s"', 'slowstart = "-1s"'),
        ("backup = true", 'backup = "yes"'),
    ]:
        with pytest.raises(ConfigError, match=bad.split(" ")[0]):
            parse_config(text.replace(good, bad))


def test_a_backend_keeps_its_ramp_across_a_reload() -> None:
    clock = Clock()
    old = _pool([{"address": "192.0.2.1:80", "weight": 10, "slowstart": "10s"}], clock)
    backend: Backend = old.backends[0]
    old.set_health(backend, False)
    old.set_health(backend, True)
    clock.now += 1.0
    config = PoolConfig(
        backends=(BackendConfig(address="192.0.2.1:80", weight=20, slowstart="10s"),)
    )
    new = Pool("p", config, old, clock=clock)
    new.reconcile(old, keep_api=False)  # the reload put in force (the runtime's swap)
    assert new.backends[0] is backend
    assert backend.eff_weight == 2 and new.ramp_next is not None  # 1 s of 10: 10% of 20
