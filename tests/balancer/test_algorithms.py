"""Balancing algorithms, driven through the Pool as the runtime uses them."""

from __future__ import annotations

import collections
import ipaddress
import random

import pytest

from l4lb.balancer.algorithms import Maglev, RandomTwo, maglev_table
from l4lb.balancer.pool import BackendState, Pool
from l4lb.config.schema import BackendConfig, PoolConfig


def make_pool(balance: str, weights: list[int], max_conns: list[int | None] | None = None) -> Pool:
    backends = tuple(
        BackendConfig(
            address=f"127.0.0.1:{9001 + i}",
            weight=w,
            max_conns=(max_conns[i] if max_conns else None),
        )
        for i, w in enumerate(weights)
    )
    return Pool("p", PoolConfig(backends=backends, balance=balance))  # type: ignore[arg-type]


CLIENTS = [str(ipaddress.ip_address(0x0A000000 + i * 7919)) for i in range(20000)]


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ([1, 1, 1], "ABC"),
        ([5, 1, 1], "AABACAA"),
        ([2, 1], "ABA"),
        ([3, 0, 1], "AACA"),
    ],
)
def test_smooth_wrr_exact_cycle(weights: list[int], expected: str) -> None:
    pool = make_pool("roundrobin", weights)
    names = {b: "ABC"[i] for i, b in enumerate(pool.backends)}
    cycle = len(expected)
    picks = "".join(names[pool.pick("10.0.0.1")] for _ in range(cycle * 3))  # type: ignore[index]
    assert picks == expected * 3


def test_smooth_wrr_proportions_and_skips_full_backends() -> None:
    pool = make_pool("roundrobin", [3, 2, 1], max_conns=[None, 1, None])
    b0, b1, b2 = pool.backends
    b1.active = 1  # full
    counts = collections.Counter(pool.pick("10.0.0.1") for _ in range(400))
    assert counts[b1] == 0
    assert counts[b0] == 300 and counts[b2] == 100


def test_leastconn_prefers_fewest_relative_to_weight() -> None:
    pool = make_pool("leastconn", [1, 1, 2])
    b0, b1, b2 = pool.backends
    b0.active, b1.active, b2.active = 3, 1, 4
    assert pool.pick("x") is b1
    b1.active = 5
    assert pool.pick("x") is b2  # 4/2 = 2 < 3
    b0.active = b1.active = b2.active = 0
    seen = {pool.pick("x") for _ in range(6)}
    assert seen == {b0, b1, b2}  # ties rotate


def test_random2_picks_less_loaded_and_respects_exclude() -> None:
    pool = make_pool("random2", [1, 1, 1, 1])
    algo = pool.algorithm
    assert isinstance(algo, RandomTwo)
    algo.rng = random.Random(7)
    heavy = pool.backends[0]
    heavy.active = 1000
    counts = collections.Counter(pool.pick("x") for _ in range(2000))
    # heavy wins only when both draws are heavy: about 1/16 of picks
    assert counts[heavy] < 250
    for _ in range(50):
        assert pool.pick("x", exclude=tuple(pool.backends[1:])) is heavy


def test_all_down_gives_none() -> None:
    for balance in ("roundrobin", "leastconn", "random2", "maglev"):
        pool = make_pool(balance, [1, 1])
        for b in pool.backends:
            pool.set_health(b, False, "refused")
        assert pool.pick("10.0.0.1") is None
        pool.set_health(pool.backends[1], True, "ok")
        assert pool.pick("10.0.0.1") is pool.backends[1]


def test_admin_states_and_algorithms_skip_them() -> None:
    pool = make_pool("roundrobin", [1, 1, 1])
    b0, b1, b2 = pool.backends
    assert pool.set_admin(b0, "drain") is BackendState.DRAIN
    assert pool.set_admin(b1, "disable") is BackendState.DISABLED
    pool.set_health(b2, False)
    assert b2.state is BackendState.DOWN
    assert pool.pick("x") is None
    assert pool.set_admin(b0, "enable") is BackendState.UP
    assert {pool.pick("x") for _ in range(4)} == {b0}
    with pytest.raises(ValueError):
        pool.set_admin(b0, "explode")
    assert pool.backend("127.0.0.1:9002") is b1
    with pytest.raises(LookupError):
        pool.backend("127.0.0.1:1")


def _assignment(pool: Pool) -> dict[str, str]:
    return {c: pool.pick(c).address for c in CLIENTS}  # type: ignore[union-attr]


def test_maglev_deterministic_across_instances() -> None:
    a = make_pool("maglev", [1, 1, 1, 1, 1])
    b = make_pool("maglev", [1, 1, 1, 1, 1])
    assert _assignment(a) == _assignment(b)
    counts = collections.Counter(_assignment(a).values())
    assert all(3000 < n < 5000 for n in counts.values()), counts  # ~4000 each


def test_maglev_removing_one_of_n_moves_about_one_nth() -> None:
    n = 5
    full = make_pool("maglev", [1] * n)
    before = _assignment(full)
    fewer = Pool(
        "p",
        PoolConfig(backends=full.config.backends[:-1], balance="maglev"),
    )
    after = _assignment(fewer)
    removed = full.backends[-1].address
    moved = sum(1 for c in CLIENTS if before[c] != after[c])
    owned = sum(1 for c in CLIENTS if before[c] == removed)
    assert owned / len(CLIENTS) == pytest.approx(1 / n, abs=0.04)
    # Maglev is near-minimal: almost only the removed backend's clients move
    assert moved <= owned * 1.3, (moved, owned)


def test_maglev_down_backend_remaps_only_its_clients() -> None:
    pool = make_pool("maglev", [1, 1, 1, 1])
    before = _assignment(pool)
    down = pool.backends[2]
    pool.set_health(down, False, "check failed")
    after = _assignment(pool)
    for client in CLIENTS:
        if before[client] != down.address:
            assert after[client] == before[client]
        else:
            assert after[client] != down.address
    pool.set_health(down, True, "ok")
    assert _assignment(pool) == before


def test_maglev_full_backend_overflows_without_moving_others() -> None:
    pool = make_pool("maglev", [1, 1, 1], max_conns=[1, None, None])
    before = _assignment(pool)
    full = pool.backends[0]
    full.active = 1
    after = _assignment(pool)
    assert all(after[c] != full.address for c in CLIENTS)
    assert all(after[c] == before[c] for c in CLIENTS if before[c] != full.address)


def test_maglev_weights_and_table() -> None:
    table = maglev_table([("a", 3), ("b", 1)], size=1009)
    counts = collections.Counter(table)
    assert -1 not in counts
    assert counts[0] / counts[1] == pytest.approx(3, rel=0.1)
    assert maglev_table([("a", 3), ("b", 1)], size=1009) == table
    algo = Maglev(size=1009)
    assert algo.pick("10.0.0.1", ()) is None  # no members
