"""Read a TOML file into a validated :class:`~l4lb.config.schema.Config`, or report every error.

msgspec stops at the first error, so the loader walks the schema itself: each value is converted
with msgspec on its own (leaf types, ``Meta`` constraints, ``Literal`` choices), every problem is
collected with its key path (``pools.web.backends[1].address``), and only a clean document is
converted as a whole. Rules that span tables (a listener's pool exists, names and binds are unique)
follow. The result is all the errors at once, each saying where and what would be valid.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import os
import re
import ssl
import stat
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from l4lb.config import anycast, schema, values
from l4lb.observe.syslog import is_target as is_syslog
from l4lb.observe.syslog import local_problem as syslog_problem

__all__ = ["ConfigError", "ConfigIssue", "load_config", "parse_config"]

MAX_CONFIG_BYTES = 64 << 20
"""The largest config file read: far above any real one (100,000 inline CIDRs are ~2 MiB), and
a bound, so ``l4lb check -c /dev/zero`` is an error instead of reading until memory runs out."""


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem: the key path (``listeners[0].bind``, empty for the whole file) and a message.

    ``line`` is where the key (or its table) is in the file, when it could be found.
    """

    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        return text if self.line is None else f"{text} (line {self.line})"


class ConfigError(Exception):
    """The configuration is invalid; ``issues`` lists every problem found."""

    def __init__(self, source: str, issues: list[ConfigIssue]) -> None:
        self.source = source
        self.issues = issues
        n = len(issues)
        lines = [f"{source}: {n} error{'s' if n != 1 else ''}"]
        lines += [f"  {issue}" for issue in issues]
        super().__init__("\n".join(lines))


def load_config(
    path: str | os.PathLike[str],
    *,
    warnings: list[ConfigIssue] | None = None,
    check_files: bool = False,
) -> schema.Config:
    """Read and validate ``path``; raise :class:`ConfigError` naming the file on any problem.

    ``warnings``, when given, receives what is valid but dangerous (see :func:`config_warnings`),
    so ``l4lb check`` and ``l4lb run`` can both say it. ``check_files`` also refuses an access
    log that cannot be opened (``l4lb check``; ``l4lb run`` finds out when it opens it).
    """
    p = Path(path)
    try:
        with p.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(
                str(p),
                [
                    ConfigIssue(
                        "",
                        f"larger than {MAX_CONFIG_BYTES >> 20} MiB: put long lists in a deny_file",
                    )
                ],
            )
        text = data.decode("utf-8")
    except OSError as err:
        raise ConfigError(str(p), [ConfigIssue("", f"cannot read: {err.strerror}")]) from err
    except UnicodeDecodeError as err:
        raise ConfigError(str(p), [ConfigIssue("", f"not UTF-8 text: {err}")]) from err
    return parse_config(
        text, source=str(p), base_dir=p.parent, warnings=warnings, check_files=check_files
    )


def parse_config(
    text: str,
    *,
    source: str = "<config>",
    base_dir: Path | None = None,
    warnings: list[ConfigIssue] | None = None,
    check_files: bool = False,
) -> schema.Config:
    """Validate TOML ``text``. Relative file paths are resolved against ``base_dir``.

    ``warnings``, when given, receives the :func:`config_warnings` of a valid file;
    ``check_files``: see :func:`load_config`.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(source, [ConfigIssue("", f"TOML syntax error: {err}")]) from err
    issues: list[ConfigIssue] = []
    _walk(raw, schema.Config, "", issues)
    if issues:
        raise ConfigError(source, _with_lines(text, issues + _raw_cross_checks(raw)))
    config = msgspec.convert(raw, schema.Config)
    config = _resolve_paths(config, base_dir)
    issues += _cross_checks(config)
    issues += [ConfigIssue(path, message) for path, message in anycast.check(config)]
    if check_files:
        issues += _access_log_issues(config)
    if issues:
        raise ConfigError(source, _with_lines(text, issues))
    if warnings is not None:
        warnings += _with_lines(text, config_warnings(config))
    return config


def _access_log_issues(config: schema.Config) -> list[ConfigIssue]:
    """An access log file that cannot be opened for appending: what ``run`` would refuse."""
    target = config.log.access
    if target in ("stdout", "off") or is_syslog(target):
        return []
    why = ""
    if os.path.isdir(target):
        why = "Is a directory"
    elif not os.path.isdir(os.path.dirname(target) or "."):
        why = f"No such file or directory ({os.path.dirname(target)} does not exist)"
    if not why:
        return []
    return [
        ConfigIssue(
            "log.access",
            f"cannot open {target}: {why} (expected a writable file path, 'stdout' or 'off')",
        )
    ]


def config_warnings(config: schema.Config) -> list[ConfigIssue]:
    """What a valid file allows but an operator should hear about before it bites."""
    issues: list[ConfigIssue] = []
    for key in ("access", "events"):
        problem = syslog_problem(getattr(config.log, key))
        if problem:
            issues.append(ConfigIssue(f"log.{key}", problem))
    access = config.log.access
    if access not in ("stdout", "off") and not is_syslog(access):
        with contextlib.suppress(OSError):
            if stat.S_ISFIFO(os.stat(access).st_mode):
                issues.append(
                    ConfigIssue(
                        "log.access",
                        f"{access} is a FIFO: opening it waits for a reader, so the balancer "
                        "does not start until something reads the pipe",
                    )
                )
    for i, lst in enumerate(config.listeners):
        if lst.accept_proxy == "off":
            continue
        for j, text in enumerate(lst.trusted_proxies):
            if values.parse_cidr(text)[2] == 0:  # 0.0.0.0/0, ::/0, ::ffff:0:0/96 (IPv4's /0)
                issues.append(
                    ConfigIssue(
                        f"listeners[{i}].trusted_proxies[{j}]",
                        f"{text!r} trusts every address: anyone who can connect can send a PROXY "
                        "header and forge the client address that allow/deny, the limits, the "
                        "logs and the backends see; list only your upstream proxies",
                    )
                )
    return issues


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")
_PATH_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _with_lines(text: str, issues: list[ConfigIssue]) -> list[ConfigIssue]:
    """Add the file line of each issue's key (or of its table) where it can be found."""
    lines = text.splitlines()
    headers: list[tuple[int, bool, str]] = []  # (0-based line, is array of tables, name)
    for n, line in enumerate(lines):
        m = _HEADER.match(line)
        if m:
            name = ".".join(part.strip().strip("\"'") for part in m.group(2).split("."))
            headers.append((n, m.group(1) == "[[", name))
    located = [
        ConfigIssue(i.path, i.message, _locate(lines, headers, i.path)) if i.path else i
        for i in issues
    ]
    # in file order (stable): an operator fixes the file top to bottom
    return sorted(located, key=lambda i: (i.line is None, i.line or 0))


def _locate(lines: list[str], headers: list[tuple[int, bool, str]], path: str) -> int | None:
    tokens: list[str | int] = [
        int(index) if index else name for name, index in _PATH_TOKEN.findall(path)
    ]
    for cut in range(len(tokens), -1, -1):
        start = _table_start(headers, tokens[:cut])
        if start is None:
            continue
        rest = tokens[cut:]
        if not rest or isinstance(rest[0], int):
            return start + 1 if cut else None
        end = next((h for h, _, _ in headers if h > start), len(lines))
        key = re.compile(rf"^\s*[\"']?{re.escape(rest[0])}[\"']?\s*=")
        first = start + 1 if cut else 0
        for n in range(first, end):
            if key.match(lines[n]):
                return n + 1
        return start + 1 if cut else None
    return None


def _table_start(headers: list[tuple[int, bool, str]], prefix: list[str | int]) -> int | None:
    """The 0-based line of the header for this path prefix (-1 for the top level), or None."""
    if not prefix:
        return -1
    if isinstance(prefix[-1], int):
        name = ".".join(str(t) for t in prefix[:-1])
        found = [h for h, is_array, hname in headers if is_array and hname == name]
        return found[prefix[-1]] if prefix[-1] < len(found) else None
    if any(isinstance(t, int) for t in prefix):
        return None
    name = ".".join(str(t) for t in prefix)
    for h, is_array, hname in headers:
        if not is_array and hname == name:
            return h
    return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(value: object) -> str:
    return {
        dict: "a table",
        list: "an array",
        str: "a string",
        int: "an integer",
        float: "a float",
        bool: "a boolean",
    }.get(type(value), type(value).__name__)


def _unwrap(tp: Any) -> tuple[Any, list[msgspec.Meta]]:
    """Strip ``Annotated`` (keeping its Metas) and ``| None`` when the value is not None."""
    metas: list[msgspec.Meta] = []
    while typing.get_origin(tp) is typing.Annotated:
        args = typing.get_args(tp)
        metas += [m for m in args[1:] if isinstance(m, msgspec.Meta)]
        tp = args[0]
    return tp, metas


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _msgspec_issue(path: str, err: msgspec.ValidationError) -> ConfigIssue:
    message, _, where = str(err).rpartition(" - at `$")
    if not message:
        return ConfigIssue(path, str(err))
    sub = where.rstrip("`")
    full = (path + sub) if path else sub.lstrip(".")
    return ConfigIssue(full, message)


def _walk(value: Any, tp: Any, path: str, issues: list[ConfigIssue]) -> None:
    inner, metas = _unwrap(tp)
    origin = typing.get_origin(inner)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(inner) if a is not type(None)]
        if value is None:
            _leaf(value, tp, path, issues, metas)
            return
        if len(options) == 1:
            _walk(value, options[0], path, issues)
            return
    if _is_struct(inner):
        _walk_struct(value, inner, path, issues)
        return
    if origin in (tuple, list) and not any(m.min_length or m.max_length for m in metas):
        _walk_array(value, inner, path, issues)
        return
    if origin in (tuple, list):
        before = len(issues)
        _walk_array(value, inner, path, issues)
        if len(issues) == before:
            _leaf(value, tp, path, issues, metas)
        return
    if origin is dict:
        if not isinstance(value, dict):
            issues.append(ConfigIssue(path, f"expected a table, got {_type_name(value)}"))
            return
        key_type, value_type = typing.get_args(inner)
        for key, item in value.items():
            _leaf(key, key_type, _join(path, key), issues, _unwrap(key_type)[1], what="name")
            _walk(item, value_type, _join(path, key), issues)
        return
    _leaf(value, tp, path, issues, metas)


def _walk_array(value: Any, tp: Any, path: str, issues: list[ConfigIssue]) -> None:
    args = typing.get_args(tp)
    item_type = args[0]
    if not isinstance(value, list):
        message = f"expected an array, got {_type_name(value)}"
        if isinstance(value, dict) and _is_struct(_unwrap(item_type)[0]):
            message += f": write [[{path}]] (double brackets) before each entry, not [{path}]"
        issues.append(ConfigIssue(path, message))
        return
    for i, item in enumerate(value):
        _walk(item, item_type, f"{path}[{i}]", issues)


def _walk_struct(
    value: Any, tp: type[msgspec.Struct], path: str, issues: list[ConfigIssue]
) -> None:
    fields = {f.encode_name: f for f in msgspec.structs.fields(tp)}
    if not isinstance(value, dict):
        message = f"expected a table, got {_type_name(value)}"
        if isinstance(value, str) and "address" in fields:
            message += (
                f": write {{ address = {value!r} }} (e.g. backends = [{{ address = {value!r} }}])"
            )
        issues.append(ConfigIssue(path, message))
        return
    before = len(issues)
    for key in value:
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            home = _BELONGS.get((tp.__name__, key))
            if home is not None:
                hint = f"it belongs to {home}; "
            issues.append(
                ConfigIssue(
                    _join(path, key), f"unknown key; {hint}valid keys here: {', '.join(fields)}"
                )
            )
    for name, field in fields.items():
        if name not in value:
            if field.required:
                issues.append(ConfigIssue(_join(path, name), "missing (this key is required)"))
            continue
        _walk(value[name], field.type, _join(path, name), issues)
    if len(issues) == before:
        try:
            msgspec.convert(value, tp)
        except msgspec.ValidationError as err:
            issues.append(_msgspec_issue(path, err))


def _belongs() -> dict[tuple[str, str], str]:
    """(table type, key) -> where that key goes instead, for keys put in the wrong table."""
    pool = {f.encode_name for f in msgspec.structs.fields(schema.PoolConfig)}
    listener = {f.encode_name for f in msgspec.structs.fields(schema.ListenerConfig)}
    out = {("ListenerConfig", k): "the pool: set it in [pools.NAME]" for k in pool - listener}
    out.update({("PoolConfig", k): "a listener: set it in [[listeners]]" for k in listener - pool})
    return out


_BELONGS = _belongs()


def _leaf(
    value: Any,
    tp: Any,
    path: str,
    issues: list[ConfigIssue],
    metas: list[msgspec.Meta],
    what: str = "value",
) -> None:
    try:
        msgspec.convert(value, tp)
    except msgspec.ValidationError as err:
        issues.append(ConfigIssue(path, _leaf_message(value, tp, metas, str(err), what)))
        return
    for meta in metas:
        check = (meta.extra or {}).get("check")
        if check is not None and value is not None:
            try:
                schema.CHECKS[check](value)
            except ValueError as err:
                issues.append(ConfigIssue(path, str(err)))


def _literal_choices(tp: Any) -> list[Any]:
    inner, _ = _unwrap(tp)
    if typing.get_origin(inner) is typing.Literal:
        return list(typing.get_args(inner))
    if typing.get_origin(inner) in (typing.Union, types.UnionType):
        out: list[Any] = []
        for arg in typing.get_args(inner):
            out += _literal_choices(arg)
        return out
    return []


def _leaf_message(value: Any, tp: Any, metas: list[msgspec.Meta], raw: str, what: str) -> str:
    choices = _literal_choices(tp)
    if choices:
        listed = ", ".join(repr(c) for c in choices)
        return f"invalid {what} {value!r}: expected one of {listed}"
    message = raw.rpartition(" - at `")[0] or raw
    descriptions = [m.description for m in metas if m.description]
    if descriptions:
        return f"invalid {what} {value!r}: expected {descriptions[0]}"
    return f"invalid {what} {value!r}: {message}"


def _resolve_paths(config: schema.Config, base_dir: Path | None) -> schema.Config:
    if base_dir is None:
        return config

    def resolve(p: str) -> str:
        return p if os.path.isabs(p) else str((base_dir / p).resolve())

    listeners = tuple(
        msgspec.structs.replace(lst, deny_file=resolve(lst.deny_file))
        if lst.deny_file is not None
        else lst
        for lst in config.listeners
    )
    log = config.log
    if log.access not in ("stdout", "off") and not is_syslog(log.access):
        log = msgspec.structs.replace(log, access=resolve(log.access))
    pools = dict(config.pools)
    for name, pool in pools.items():
        health = pool.health
        if health is not None and health.tls_ca_file is not None:
            health = msgspec.structs.replace(health, tls_ca_file=resolve(health.tls_ca_file))
            pools[name] = msgspec.structs.replace(pool, health=health)
    state = None if config.state_file is None else resolve(config.state_file)
    return msgspec.structs.replace(
        config, listeners=listeners, log=log, pools=pools, state_file=state
    )


def _raw_cross_checks(raw: dict[str, Any]) -> list[ConfigIssue]:
    """The references between tables, checked on a document that has other errors too.

    So one run of ``l4lb check`` also reports a listener naming a missing pool, or two
    listeners with one name, next to the per-key errors.
    """
    issues: list[ConfigIssue] = []
    pools = raw.get("pools")
    listeners = raw.get("listeners")
    if not isinstance(pools, dict) or not isinstance(listeners, list):
        return issues
    names: dict[str, int] = {}
    for i, lst in enumerate(listeners):
        if not isinstance(lst, dict):
            continue
        name, pool = lst.get("name"), lst.get("pool")
        if isinstance(name, str):
            if name in names:
                issues.append(
                    ConfigIssue(
                        f"listeners[{i}].name",
                        f"duplicate name {name!r} (also listeners[{names[name]}])",
                    )
                )
            names.setdefault(name, i)
        if isinstance(pool, str) and pool not in pools:
            valid = ", ".join(repr(p) for p in sorted(pools)) or "none are defined"
            issues.append(
                ConfigIssue(f"listeners[{i}].pool", f"no pool {pool!r}; defined pools: {valid}")
            )
    return issues


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


_FILE_KINDS = (
    (stat.S_ISDIR, "is a directory"),
    (stat.S_ISCHR, "is not a regular file (a character device)"),
    (stat.S_ISBLK, "is not a regular file (a block device)"),
    (stat.S_ISFIFO, "is not a regular file (a FIFO: reading it would wait for a writer)"),
    (stat.S_ISSOCK, "is not a regular file (a socket)"),
)


def _not_a_list_file(path: str) -> str | None:
    """Why ``path`` cannot be a deny list (None if it is a regular file; empty is fine).

    Checked with ``stat`` before any ``open``: opening a FIFO would block ``l4lb check``.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"no such file: {path}"
    except OSError as err:
        return f"{path}: cannot read: {err.strerror or err}"
    for test, what in _FILE_KINDS:
        if test(mode):
            return f"{path} {what}; give a text file with one CIDR a line (it may be empty)"
    if not stat.S_ISREG(mode):
        return f"{path} is not a regular file; give a text file with one CIDR a line"
    return None


def _have_dnspython() -> bool:
    """Whether the resolver library of DNS-named backends can be imported (the ``dns`` extra)."""
    try:
        import dns.asyncresolver  # noqa: F401
    except ImportError:
        return False
    return True


def _route_issues(
    where: str, lst: schema.ListenerConfig, config: schema.Config
) -> list[ConfigIssue]:
    """Routes to missing pools, and routes an earlier route shadows (they can never match)."""
    from l4lb.balancer.routes import unreachable

    issues = []
    valid = ", ".join(repr(p) for p in sorted(config.pools)) or "none are defined"
    for k, route in enumerate(lst.routes):
        if route.pool not in config.pools:
            issues.append(
                ConfigIssue(
                    f"{where}.routes[{k}].pool", f"no pool {route.pool!r}; defined pools: {valid}"
                )
            )
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


def _cross_checks(config: schema.Config) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    names: dict[str, int] = {}
    binds: dict[tuple[str, int], int] = {}
    pools = sorted(config.pools)
    for i, lst in enumerate(config.listeners):
        where = f"listeners[{i}]"
        if lst.name in names:
            issues.append(
                ConfigIssue(
                    f"{where}.name",
                    f"duplicate name {lst.name!r} (also listeners[{names[lst.name]}])",
                )
            )
        names.setdefault(lst.name, i)
        addr = lst.bind_addr
        if addr in binds:
            issues.append(
                ConfigIssue(
                    f"{where}.bind", f"{lst.bind!r} is already bound by listeners[{binds[addr]}]"
                )
            )
        binds.setdefault(addr, i)
        if lst.pool not in config.pools:
            valid = ", ".join(repr(p) for p in pools) or "none are defined"
            issues.append(
                ConfigIssue(f"{where}.pool", f"no pool {lst.pool!r}; defined pools: {valid}")
            )
        issues += _route_issues(where, lst, config)
        problem = _not_a_list_file(lst.deny_file) if lst.deny_file is not None else None
        if problem is not None:
            issues.append(ConfigIssue(f"{where}.deny_file", problem))
        elif lst.deny_file is not None:
            from l4lb.trust.cidr import CidrError, CidrSet  # every line checked: file:line errors

            try:
                CidrSet.from_file(lst.deny_file)
            except CidrError as err:
                issues.append(ConfigIssue(f"{where}.deny_file", str(err)))
    if config.admin is not None and config.admin.bind_addr in binds:
        issues.append(ConfigIssue("admin.bind", f"{config.admin.bind!r} is also a listener's bind"))
    for name, pool in config.pools.items():
        seen: dict[tuple[str, str, int], int] = {}
        for j, backend in enumerate(pool.backends):
            where = f"pools.{name}.backends[{j}]"
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
                else own_listener((target.host, target.port), config.listeners)
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
        issues += _source_issues(name, pool)
        ca_file = pool.health.tls_ca_file if pool.health is not None else None
        if ca_file is not None:
            try:
                ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as err:
                why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
                issues.append(
                    ConfigIssue(
                        f"pools.{name}.health.tls_ca_file",
                        f"cannot load CA certificates from {ca_file}: {why} "
                        "(expected a PEM file of CA certificates)",
                    )
                )
        if pool.proxy_tlvs and pool.send_proxy != "v2":
            issues.append(
                ConfigIssue(
                    f"pools.{name}.proxy_tlvs",
                    f"TLVs need send_proxy = 'v2' (the pool sends {pool.send_proxy!r})",
                )
            )
    if config.transparent_routing == "manage" and config.workers > 1:
        issues.append(
            ConfigIssue(
                "transparent_routing",
                "'manage' needs workers = 1 (each worker would add and remove the same rules); "
                "with several workers add the rules once (docs/transparent.md) and use 'check'",
            )
        )
    return issues


def _source_issues(name: str, pool: schema.PoolConfig) -> list[ConfigIssue]:
    """The ``source`` key's rules: a transparent backend gets no PROXY header, and a
    fixed source address has the backend's family."""
    issues: list[ConfigIssue] = []
    pool_level = False
    for j, backend in enumerate(pool.backends):
        where = f"pools.{name}.backends[{j}]"
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
        elif source not in ("client", "balancer"):
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
