"""The ``source`` key (issue 12): its values, the per-backend override, and its cross-checks."""

from __future__ import annotations

import pytest

from l4lb.balancer.pool import Pool
from l4lb.balancer.transparent import CLIENT, Source, SourceKind, parse_source
from l4lb.config.loader import ConfigError, parse_config
from l4lb.config.schema import Config

BASE = """\
workers = {workers}
{top}
[[listeners]]
name = "a"
bind = "127.0.0.1:9000"
pool = "p"

[pools.p]
{pool}
backends = [{backends}]
"""


def load(
    pool: str = "", backends: str = '{ address = "127.0.0.1:80" }', top: str = "", workers: int = 1
) -> Config:
    return parse_config(BASE.format(pool=pool, backends=backends, top=top, workers=workers))


def errors(**kw: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(**kw)  # type: ignore[arg-type]
    return [str(issue) for issue in info.value.issues]


def test_default_is_the_balancer_and_compiles_to_nothing() -> None:
    config = load()
    pool = config.pools["p"]
    assert pool.source == "balancer"
    assert Pool("p", pool).backends[0].source is None


def test_a_pool_may_mix_transparent_and_proxy_backends() -> None:
    config = load(
        pool='source = "client"\nsend_proxy = "off"',
        backends='{ address = "127.0.0.1:80" }, '
        '{ address = "127.0.0.1:81", source = "balancer", send_proxy = "v2" }, '
        '{ address = "127.0.0.1:82", source = "127.0.0.5" }',
    )
    backends = Pool("p", config.pools["p"]).backends
    assert [b.source for b in backends] == [CLIENT, None, Source(SourceKind.ADDRESS, "127.0.0.5")]
    assert [b.proxy_version for b in backends] == [0, 2, 0]


def test_client_source_with_a_proxy_header_is_refused() -> None:
    (message,) = errors(pool='source = "client"')
    assert message.startswith("pools.p.send_proxy: source = 'client'")
    assert "set send_proxy = 'off'" in message
    (message,) = errors(backends='{ address = "127.0.0.1:80", source = "client" }')
    assert message.startswith("pools.p.backends[0]: source = 'client'")
    (message,) = errors(
        pool='source = "client"\nsend_proxy = "off"',
        backends='{ address = "127.0.0.1:80", send_proxy = "v1" }',
    )
    assert message.startswith("pools.p.backends[0].send_proxy: ")


@pytest.mark.parametrize("value", ["clients", "", "198.51.100.300", "2001:db8::/64", "localhost"])
def test_a_bad_value_names_the_key_and_the_choices(value: str) -> None:
    (message,) = errors(pool=f'source = "{value}"')
    assert message.startswith(
        f"pools.p.source: invalid source {value!r}: expected 'balancer', 'client'"
    )


def test_a_fixed_source_has_the_backends_family() -> None:
    (message,) = errors(pool='source = "2001:db8::5"')
    assert message.startswith(
        "pools.p.source: source '2001:db8::5' is IPv6 but backend '127.0.0.1:80' is IPv4"
    )
    config = load(pool='source = "2001:DB8::5"', backends='{ address = "[::1]:80" }')
    pool = config.pools["p"]
    assert pool.backend_source(pool.backends[0]) == "2001:db8::5"  # normalized


def test_transparent_routing_choices_and_manage_with_workers() -> None:
    assert load().transparent_routing == "check"
    assert load(top='transparent_routing = "manage"').transparent_routing == "manage"
    (message,) = errors(top='transparent_routing = "auto"')
    assert "expected one of 'check', 'manage', 'off'" in message
    (message,) = errors(top='transparent_routing = "manage"', workers=2)
    assert message.startswith("transparent_routing: 'manage' needs workers = 1")


def test_parse_source() -> None:
    assert parse_source("balancer") is None
    assert parse_source("client") is CLIENT
    assert parse_source("198.51.100.5") == Source(SourceKind.ADDRESS, "198.51.100.5")
    with pytest.raises(ValueError, match="invalid source"):
        parse_source("elsewhere")
