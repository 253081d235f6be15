"""Pool membership at run time (issue 13): backends from DNS and the API join after their
health checks, leave by draining (make before break), are forgotten when their connections
end, and a reload keeps them by the documented rule."""

from __future__ import annotations

from l4lb.balancer.pool import BackendState, Origin, Pool
from l4lb.config.schema import BackendConfig, HealthConfig, PoolConfig

NAME = "app.internal:9000"


def pool_config(*addresses: str, checked: bool = True) -> PoolConfig:
    return PoolConfig(
        backends=tuple(BackendConfig(address=a) for a in addresses),
        health=HealthConfig() if checked else None,
    )


def members(*addresses: str, weight: int = 1) -> list[BackendConfig]:
    return [BackendConfig(address=a, weight=weight) for a in addresses]


def test_dns_entries_make_no_backend_until_resolved() -> None:
    pool = Pool("web", pool_config("127.0.0.1:1", NAME))
    assert [b.address for b in pool.backends] == ["127.0.0.1:1"]


def test_a_newcomer_waits_for_its_checks_unless_the_pool_is_unchecked() -> None:
    pool = Pool("web", pool_config(NAME))
    assert pool.sync_dns(NAME, members("10.0.0.1:9000"), up=True)  # the answer at start
    assert pool.sync_dns(NAME, members("10.0.0.1:9000", "10.0.0.2:9000"))
    first, second = pool.backends
    assert first.state is BackendState.UP and second.state is BackendState.DOWN
    assert (second.origin, second.name) == (Origin.DNS, NAME)
    assert {pool.pick("192.0.2.1") for _ in range(10)} == {first}
    unchecked = Pool("web", pool_config(NAME, checked=False))
    unchecked.sync_dns(NAME, members("10.0.0.2:9000"))
    assert unchecked.backends[0].state is BackendState.UP


def test_an_address_that_goes_drains_only_once_another_is_up() -> None:
    pool = Pool("web", pool_config(NAME))
    pool.sync_dns(NAME, members("10.0.0.1:9000"), up=True)
    (old,) = pool.backends
    old.active = 2
    pool.sync_dns(NAME, members("10.0.0.2:9000"))  # replaced; the new one is not checked yet
    new = pool.backend("10.0.0.2:9000")
    assert old.leaving and old.state is BackendState.UP  # still serving: nothing else can
    assert pool.pick("192.0.2.1") is old
    pool.set_health(new, True, "rise")
    assert old.state is BackendState.DRAIN and pool.pick("192.0.2.1") is new
    assert pool.forget_drained() == []  # connections still open
    old.active = 0
    assert pool.forget_drained() == [old]
    assert [b.address for b in pool.backends] == ["10.0.0.2:9000"]


def test_an_address_back_before_it_was_forgotten_is_the_same_backend() -> None:
    pool = Pool("web", pool_config(NAME, checked=False))
    pool.sync_dns(NAME, members("10.0.0.1:9000", "10.0.0.2:9000"))
    first = pool.backend("10.0.0.1:9000")
    first.active, first.total = 1, 5
    pool.sync_dns(NAME, members("10.0.0.2:9000"))
    assert first.state is BackendState.DRAIN
    pool.sync_dns(NAME, members("10.0.0.1:9000", "10.0.0.2:9000"))
    assert pool.backend("10.0.0.1:9000") is first and first.state is BackendState.UP
    assert not first.leaving and first.total == 5


def test_dns_does_not_take_over_an_address_the_config_has() -> None:
    pool = Pool("web", pool_config("10.0.0.1:9000", NAME, checked=False))
    assert not pool.sync_dns(NAME, members("10.0.0.1:9000"))
    (only,) = pool.backends
    assert only.origin is Origin.CONFIG


def api_changed_pool() -> tuple[Pool, PoolConfig]:
    config = pool_config("10.0.0.1:9000", checked=False)
    pool = Pool("web", config)
    pool.add_backend(BackendConfig(address="10.0.0.9:9000", weight=3), Origin.API)
    pool.set_limits(pool.backends[0], 5, 10)
    return pool, config


def test_a_reload_drops_api_changes_by_default() -> None:
    pool, config = api_changed_pool()
    new = Pool("web", config, pool)
    new.reconcile(pool, keep_api=False)
    assert [b.address for b in new.backends] == ["10.0.0.1:9000"]  # unused: forgotten
    assert (new.backends[0].weight, new.backends[0].max_conns) == (1, None)


def test_keep_api_backends_keeps_them_and_their_limits() -> None:
    pool, config = api_changed_pool()
    added = pool.backends[1]
    new = Pool("web", config, pool)
    new.reconcile(pool, keep_api=True)
    assert new.backends[1] is added and added.weight == 3 and added.origin is Origin.API
    assert (new.backends[0].weight, new.backends[0].max_conns) == (5, 10)
    pool, config = api_changed_pool()  # a reload that keeps the pool object (same config)
    pool.reconcile(pool, keep_api=True)
    assert len(pool.backends) == 2 and pool.backends[0].weight == 5


def test_a_reload_drains_what_it_drops_while_it_has_connections() -> None:
    pool = Pool("web", pool_config("10.0.0.1:9000", NAME, checked=False))
    pool.sync_dns(NAME, members("10.0.0.5:9000"))
    resolved = pool.backend("10.0.0.5:9000")
    resolved.active = 1
    new = Pool("web", pool_config("10.0.0.1:9000", checked=False), pool)  # the name is gone
    new.reconcile(pool, keep_api=False)
    assert new.backend("10.0.0.5:9000") is resolved
    assert resolved.leaving and resolved.state is BackendState.DRAIN
    kept = Pool("web", pool_config("10.0.0.1:9000", NAME, checked=False), pool)
    kept.reconcile(pool, keep_api=False)
    assert kept.backend("10.0.0.5:9000") is resolved
