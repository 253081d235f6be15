"""Routes by SNI and ALPN: the matching table, the config checks, and a Connection routed by a
ClientHello that arrives in two segments (driven in-process with real sockets)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from l4lb.balancer import relay
from l4lb.balancer.admission import Admitted
from l4lb.balancer.connection import Connection, State
from l4lb.balancer.pool import Pool
from l4lb.balancer.relay_contract import EndReason
from l4lb.balancer.routes import RouteTable, unreachable
from l4lb.config.loader import ConfigError, parse_config
from l4lb.config.schema import BackendConfig, PoolConfig, RouteConfig
from tests.balancer.test_connection import (
    CLIENT,
    DESTINATION,
    Owner,
    ReadsSeen,
    _run,
    _server,
    _tcp_pair,
)
from tests.balancer.test_tls_peek import client_hello

ROUTES = [
    RouteConfig(sni="api.example.com", pool="api"),
    RouteConfig(sni="*.example.com", alpn="h2", pool="web-h2"),
    RouteConfig(sni="*.example.com", pool="web"),
    RouteConfig(alpn="acme-tls/1", pool="acme"),
]


@pytest.mark.parametrize(
    ("sni", "alpn", "pool"),
    [
        ("api.example.com", [b"h2"], "api"),  # first match wins over the h2 wildcard
        ("API.Example.COM", [], "api"),  # case-insensitive
        ("api.example.com.", [], "api"),  # a trailing dot is the same name
        ("www.example.com", [b"http/1.1", b"h2"], "web-h2"),  # any of the offers
        ("www.example.com", [b"http/1.1"], "web"),
        ("a.b.example.com", [], "web"),  # a wildcard takes deeper names too (nginx)
        ("example.com", [], None),  # but not the bare domain
        ("badexample.com", [], None),  # a suffix match is on a label boundary
        (None, [b"h2"], None),  # no SNI: only routes without sni can match
        (None, [b"acme-tls/1"], "acme"),
        ("other.test", [], None),
    ],
)
def test_first_matching_route_wins(sni: str | None, alpn: list[bytes], pool: str | None) -> None:
    route = RouteTable(ROUTES).match(sni, alpn)
    assert (route.pool if route is not None else None) == pool


def test_route_labels_name_the_route() -> None:
    assert [r.label for r in RouteTable(ROUTES).routes] == [
        "api.example.com",
        "*.example.com/h2",
        "*.example.com",
        "*/acme-tls/1",
    ]
    assert RouteConfig(sni="a.test", pool="p", name="a").label == "a"


@pytest.mark.parametrize(
    ("routes", "shadowed"),
    [
        (ROUTES, []),
        ([("*.example.com", None), ("api.example.com", None)], [(1, 0)]),
        ([("*.example.com", None), ("*.eu.example.com", "h2")], [(1, 0)]),
        ([("api.example.com", None), ("API.example.com", None)], [(1, 0)]),
        ([("*.example.com", "h2"), ("api.example.com", None)], []),  # h2 only: not all
        ([("*.example.com", "h2"), ("api.example.com", "h2")], [(1, 0)]),
        ([(None, "h2"), ("api.example.com", "h2")], [(1, 0)]),
        ([("*.example.com", None), ("example.com", None)], []),
    ],
)
def test_unreachable_routes_are_found(routes: Any, shadowed: list[tuple[int, int]]) -> None:
    if routes and isinstance(routes[0], tuple):
        routes = [RouteConfig(sni=s, alpn=a, pool="p") for s, a in routes]
    assert unreachable(routes) == shadowed


CONFIG = """
[[listeners]]
name = "tls"
bind = "127.0.0.1:8443"
pool = "default"
{extra}
routes = [
{routes}
]

[pools.default]
backends = [{{ address = "127.0.0.1:9001" }}]
[pools.api]
backends = [{{ address = "127.0.0.1:9002" }}]
"""


def _config(routes: str, extra: str = "") -> Any:
    return parse_config(CONFIG.format(routes=routes, extra=extra))


def test_a_valid_route_table_loads() -> None:
    config = _config('{ sni = "api.example.com", pool = "api" }', 'default = "reject"')
    listener = config.listeners[0]
    assert listener.routes[0].pool == "api" and listener.default == "reject"
    assert listener.tls_peek_timeout_s == 1.0


@pytest.mark.parametrize(
    ("routes", "extra", "message"),
    [
        ('{ sni = "api.example.com", pool = "nope" }', "", "routes[0].pool: no pool 'nope'"),
        (
            '{ sni = "*.example.com", pool = "api" },\n{ sni = "a.example.com", pool = "default" }',
            "",
            "routes[1]: unreachable: routes[0] ('*.example.com')",
        ),
        ('{ pool = "api" }', "", "a route needs sni, alpn or both"),
        ('{ sni = "a b", pool = "api" }', "", "routes[0].sni"),
        ('{ sni = "a.test", pool = "api", port = 1 }', "", "port"),
        (
            '{ sni = "a.test", pool = "api", name = "x" },\n'
            '{ sni = "b.test", pool = "api", name = "x" }',
            "",
            "route name 'x' is also routes[0]'s",
        ),
        ('{ sni = "a.test", pool = "api" }', 'default = "drop"', "default"),
        ('{ sni = "a.test", pool = "api" }', 'tls_peek_timeout = "0s"', "more than 0s"),
    ],
)
def test_bad_routes_are_config_errors(routes: str, extra: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _config(routes, extra)
    assert message in str(err.value)


def test_reject_without_routes_is_an_error() -> None:
    text = CONFIG.replace("routes = [\n{routes}\n]", "").format(extra='default = "reject"')
    with pytest.raises(ConfigError, match="default = 'reject' needs routes"):
        parse_config(text)


class RoutingOwner(Owner):
    """The test owner plus what routes need: pools by name and the per-route counter."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pools: dict[str, Pool]) -> None:
        super().__init__(loop, relay.start_relay)
        self.pools = pools
        from collections import Counter

        self.route_counts: Counter[str] = Counter()

    def pool_named(self, name: str) -> Pool | None:
        return self.pools.get(name)


def _pool_at(name: str, srv: socket.socket) -> Pool:
    address = f"127.0.0.1:{srv.getsockname()[1]}"
    return Pool(name, PoolConfig(backends=(BackendConfig(address=address),), send_proxy="off"))


def test_a_client_hello_in_two_segments_is_routed_and_forwarded_whole() -> None:
    hello = client_hello("www.example.com", ["http/1.1", "h2"])

    peeks = ReadsSeen()

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        default_srv, web_srv = _server(), _server()
        pools = {"default": _pool_at("default", default_srv), "web-h2": _pool_at("web", web_srv)}
        owner = RoutingOwner(loop, pools)
        table = RouteTable(ROUTES[1:2], peek_timeout=10.0)
        client, accepted = _tcp_pair()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peeks.fd = accepted.fileno()
        conn = Connection(owner, pools["default"], accepted, Admitted(CLIENT, DESTINATION), table)
        conn.start()
        client.sendall(hello[:30])
        await peeks.read.wait()  # the first part was looked at
        assert conn.state is State.PEEKING  # not enough to route yet
        client.sendall(hello[30:])
        far, _ = await loop.sock_accept(web_srv)
        got = b""
        while len(got) < len(hello):
            got += await loop.sock_recv(far, 1 << 16)
        assert got == hello  # peeked, never consumed
        assert conn.route == "*.example.com/h2" and conn.pool is pools["web-h2"]
        assert owner.route_counts == {"*.example.com/h2": 1}
        conn.close(EndReason.SHUTDOWN)
        await owner.ended
        for s in (client, far, default_srv, web_srv):
            s.close()

    _run(body, peeks)


def test_no_match_with_reject_resets_the_client() -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        srv = _server()
        pools = {"default": _pool_at("default", srv)}
        owner = RoutingOwner(loop, pools)
        table = RouteTable(ROUTES[:1], reject=True, peek_timeout=10.0)
        client, accepted = _tcp_pair()
        conn = Connection(owner, pools["default"], accepted, Admitted(CLIENT, DESTINATION), table)
        conn.start()
        client.sendall(client_hello("other.test", []))
        reason, detail = await owner.ended
        assert reason is EndReason.NO_ROUTE
        assert "sni='other.test'" in detail
        client.settimeout(5)
        with pytest.raises(ConnectionResetError):
            client.recv(10)
        client.close()
        srv.close()

    _run(body)


def test_plain_text_goes_to_the_default_pool_at_once() -> None:
    """Not TLS: decided on the first byte, the peek timeout is not waited for."""

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        srv = _server()
        pools = {"default": _pool_at("default", srv)}
        owner = RoutingOwner(loop, pools)
        table = RouteTable(ROUTES, peek_timeout=60.0)
        client, accepted = _tcp_pair()
        conn = Connection(owner, pools["default"], accepted, Admitted(CLIENT, DESTINATION), table)
        conn.start()
        client.sendall(b"GET / HTTP/1.0\r\n\r\n")
        far, _ = await loop.sock_accept(srv)
        assert await loop.sock_recv(far, 100) == b"GET / HTTP/1.0\r\n\r\n"
        assert conn.route == "default" and owner.route_counts == {"default": 1}
        conn.close(EndReason.SHUTDOWN)
        await owner.ended
        for s in (client, far, srv):
            s.close()

    _run(body)


def test_the_routes_example_in_the_docs_is_valid() -> None:
    """docs/balancer.md's routes example, as written, plus the pools it names."""
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "balancer.md").read_text()
    section = doc.split("## Routes by SNI and ALPN", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    pools = "".join(
        f'\n[pools.{name}]\nbackends = [{{ address = "192.0.2.{i}:443" }}]\n'
        for i, name in enumerate(("default", "api", "web-h2", "web"), 1)
    )
    config = parse_config(example + pools)
    assert [r.pool for r in config.listeners[0].routes] == ["api", "web-h2", "web"]
