"""The rules that span tables: a listener's pool exists, names and binds are unique, routes can
match, a backend is not the balancer itself, ``source`` and ``send_proxy`` agree, ``[anycast]``
fits the listeners.

They run on whatever parsed (:class:`~l4lb.config.partial.Parsed`), so they are reported in the
same pass as the schema's errors; a rule that would read a part that failed says nothing.
"""

from __future__ import annotations

import ipaddress

from l4lb.config import anycast, schema
from l4lb.config.issues import ConfigIssue
from l4lb.config.partial import Parsed

__all__ = ["cross_checks", "own_listener"]


def _unmapped(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address a socket really reaches: ``::ffff:127.0.0.1`` is the IPv4 127.0.0.1."""
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def own_listener(addr: tuple[str, int], listeners: tuple[schema.ListenerConfig, ...]) -> str | None:
    """The name of a listener that ``addr`` would connect to (a backend pointing at us)."""
    host, port = addr
    ip = _unmapped(host)
    for lst in listeners:
        lhost, lport = lst.bind_addr
        if lport != port:
            continue
        bound = _unmapped(lhost)
        if bound == ip:
            return lst.name
        wildcard_v4, wildcard_v6 = str(bound) == "0.0.0.0", lhost == "::"
        local = ip.is_loopback or ip.is_unspecified
        if local and (wildcard_v6 or (wildcard_v4 and ip.version == 4)):
            return lst.name
    return None


def _have_dnspython() -> bool:
    """Whether the resolver library of DNS-named backends can be imported (the ``dns`` extra)."""
    try:
        import dns.asyncresolver  # noqa: F401
    except ImportError:
        return False
    return True


def _no_pool(path: str, pool: str, parsed: Parsed) -> list[ConfigIssue]:
    """A reference to a pool the file does not define (a pool that failed is still defined)."""
    names = parsed.pool_names
    if names is None or pool in names:
        return []
    valid = ", ".join(repr(p) for p in sorted(names)) or "none are defined"
    return [ConfigIssue(path, f"no pool {pool!r}; defined pools: {valid}")]


def _route_issues(where: str, lst: schema.ListenerConfig, parsed: Parsed) -> list[ConfigIssue]:
    """Routes to missing pools, and routes an earlier route shadows (they can never match)."""
    from l4lb.balancer.routes import unreachable

    issues = []
    for k, route in enumerate(lst.routes):
        issues += _no_pool(f"{where}.routes[{k}].pool", route.pool, parsed)
    for k, earlier in unreachable(lst.routes):
        issues.append(
            ConfigIssue(
                f"{where}.routes[{k}]",
                f"unreachable: routes[{earlier}] ({lst.routes[earlier].label!r}) matches every "
                f"connection this route ({lst.routes[k].label!r}) would; first match wins, so "
                "put the more specific route first or remove it",
            )
        )
    labels: dict[str, int] = {}
    for k, route in enumerate(lst.routes):
        if route.label in labels:
            issues.append(
                ConfigIssue(
                    f"{where}.routes[{k}].name",
                    f"route name {route.label!r} is also routes[{labels[route.label]}]'s: "
                    "give each route its own name (access log and metrics tell them apart by it)",
                )
            )
        labels.setdefault(route.label, k)
    return issues


def _listener_issues(parsed: Parsed) -> list[ConfigIssue]:
    config = parsed.config
    issues: list[ConfigIssue] = []
    names: dict[str, str] = {}
    binds: dict[tuple[str, int], str] = {}
    for n, lst in enumerate(config.listeners):
        where = parsed.listener_path(n)
        if lst.name in names:
            duplicate = f"duplicate name {lst.name!r} (also {names[lst.name]})"
            issues.append(ConfigIssue(f"{where}.name", duplicate))
        names.setdefault(lst.name, where)
        addr = lst.bind_addr
        if addr in binds:
            issues.append(
                ConfigIssue(f"{where}.bind", f"{lst.bind!r} is already bound by {binds[addr]}")
            )
        binds.setdefault(addr, where)
        issues += _no_pool(f"{where}.pool", lst.pool, parsed)
        issues += _route_issues(where, lst, parsed)
    admin = config.admin if parsed.valid("admin.bind") else None
    if admin is not None and admin.bind_addr in binds:
        issues.append(ConfigIssue("admin.bind", f"{admin.bind!r} is also a listener's bind"))
    issues += _monitor_issues(parsed, binds, admin.bind_addr if admin is not None else None)
    return issues


def _monitor_issues(
    parsed: Parsed, binds: dict[tuple[str, int], str], admin: tuple[str, int] | None
) -> list[ConfigIssue]:
    """A listener's ``monitor`` port is its own: no listener's bind, no admin API, no other
    listener's monitor."""
    issues: list[ConfigIssue] = []
    seen: dict[tuple[str, int], str] = {}
    for n, lst in enumerate(parsed.config.listeners):
        addr = lst.monitor_addr
        if addr is None:
            continue
        where = f"{parsed.listener_path(n)}.monitor"
        if addr in binds:
            clash = f"{binds[addr]}.bind"
        elif addr == admin:
            clash = "[admin] bind"
        elif addr in seen:
            clash = seen[addr]
        else:
            seen[addr] = where
            continue
        issues.append(
            ConfigIssue(
                where, f"{lst.monitor!r} is also {clash}: give the monitor a port of its own"
            )
        )
    return issues


def _backend_issues(parsed: Parsed, name: str, pool: schema.PoolConfig) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    seen: dict[tuple[str, str, int], int] = {}
    for n, backend in enumerate(pool.backends):
        where = parsed.backend_path(name, n)
        j = parsed.backend_at[name][n]
        target = backend.target
        key = (target.kind.value, target.host, target.port)
        if key in seen:
            issues.append(
                ConfigIssue(
                    f"{where}.address",
                    f"duplicate backend {backend.address!r} (also backends[{seen[key]}])",
                )
            )
        seen.setdefault(key, j)
        if target.dynamic and not _have_dnspython():
            issues.append(
                ConfigIssue(
                    f"{where}.address",
                    f"{backend.address!r} is a DNS name, and resolving it needs dnspython, "
                    "which is not installed: pip install 'l4lb[dns]' (or write an IP:PORT)",
                )
            )
        loop = (
            None
            if target.dynamic
            else own_listener((target.host, target.port), parsed.config.listeners)
        )
        if loop is not None:
            issues.append(
                ConfigIssue(
                    f"{where}.address",
                    f"{backend.address!r} is the balancer's own listener {loop!r}: "
                    "connections would loop back into it until descriptors run out",
                )
            )
        if pool.proxy_tlvs and backend.send_proxy in ("v1", "off"):
            issues.append(
                ConfigIssue(
                    f"{where}.send_proxy",
                    f"{backend.send_proxy!r} cannot carry the pool's proxy_tlvs; "
                    "use 'v2' or move this backend to a pool without proxy_tlvs",
                )
            )
    return issues


def _source_issues(parsed: Parsed, name: str, pool: schema.PoolConfig) -> list[ConfigIssue]:
    """The ``source`` key's rules: a transparent backend gets no PROXY header, and a
    fixed source address has the backend's family."""
    issues: list[ConfigIssue] = []
    if not (parsed.valid(f"pools.{name}.send_proxy") and parsed.valid(f"pools.{name}.source")):
        return issues  # the pool's own value is unknown: its errors say what is wrong
    pool_level = False
    for n, backend in enumerate(pool.backends):
        where = parsed.backend_path(name, n)
        source = pool.backend_source(backend)
        proxy = pool.backend_proxy(backend)
        if source == "client" and proxy != "off":
            if backend.send_proxy is not None or backend.source is not None:
                path = f"{where}.send_proxy" if backend.send_proxy is not None else where
            elif pool_level:
                continue
            else:
                path, pool_level = f"pools.{name}.send_proxy", True
            issues.append(
                ConfigIssue(
                    path,
                    f"source = 'client' connects from the client's own address and sends no "
                    f"PROXY header, but send_proxy is {proxy!r} here: set send_proxy = 'off' "
                    "for the transparent backends",
                )
            )
        elif source not in ("client", "balancer") and not backend.dynamic:
            # a DNS-named backend's family is known once resolved (it may have both)
            backend_v6 = ":" in backend.addr[0]
            if (":" in source) != backend_v6:
                issues.append(
                    ConfigIssue(
                        f"{where}.source" if backend.source is not None else f"pools.{name}.source",
                        f"source {source!r} is IPv{6 if ':' in source else 4} but backend "
                        f"{backend.address!r} is IPv{6 if backend_v6 else 4}",
                    )
                )
    return issues


def cross_checks(parsed: Parsed) -> list[ConfigIssue]:
    """Every rule that spans tables, on the parts of the file that parsed."""
    config = parsed.config
    issues = _listener_issues(parsed)
    for name, pool in config.pools.items():
        issues += _backend_issues(parsed, name, pool)
        issues += _source_issues(parsed, name, pool)
        if pool.proxy_tlvs and pool.send_proxy != "v2":
            issues.append(
                ConfigIssue(
                    f"pools.{name}.proxy_tlvs",
                    f"TLVs need send_proxy = 'v2' (the pool sends {pool.send_proxy!r})",
                )
            )
    workers_known = parsed.valid("workers")
    if config.transparent_routing == "manage" and config.workers > 1 and workers_known:
        issues.append(
            ConfigIssue(
                "transparent_routing",
                "'manage' needs workers = 1 (each worker would add and remove the same rules); "
                "with several workers add the rules once (docs/transparent.md) and use 'check'",
            )
        )
    for path, message in anycast.check(config, all_listeners=parsed.all_listeners):
        if path != "workers" or workers_known:
            issues.append(ConfigIssue(path, message))
    return issues
