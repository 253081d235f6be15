"""Read a TOML file into a validated :class:`~l4lb.config.schema.Config`, or report every error.

msgspec stops at the first error, so the loader walks the schema itself: each value is converted
with msgspec on its own (leaf types, ``Meta`` constraints, ``Literal`` choices), and every problem
is collected with its key path (``pools.web.backends[1].address``) and a message that shows the
right form. In the same pass, the rules that span tables (:mod:`l4lb.config.crosscheck`) and what
``run`` needs from the machine (:mod:`l4lb.config.preflight`) are checked on whatever parsed
(:mod:`l4lb.config.partial`). The result is all the errors at once, in file order.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import msgspec

from l4lb.config import crosscheck, preflight, schema, values
from l4lb.config.crosscheck import own_listener
from l4lb.config.issues import ConfigError, ConfigIssue, Severity
from l4lb.config.partial import Parsed, salvage
from l4lb.observe.syslog import local_problem as syslog_problem

__all__ = [
    "ConfigError",
    "ConfigIssue",
    "Severity",
    "load_config",
    "own_listener",
    "parse_config",
]

MAX_CONFIG_BYTES = 64 << 20
"""The largest config file read: far above any real one (100,000 inline CIDRs are ~2 MiB), and
a bound, so ``l4lb check -c /dev/zero`` is an error instead of reading until memory runs out."""


def load_config(
    path: str | os.PathLike[str],
    *,
    warnings: list[ConfigIssue] | None = None,
    check_files: bool = False,
) -> schema.Config:
    """Read and validate ``path``; raise :class:`ConfigError` naming the file on any problem.

    ``warnings``, when given, receives what is valid but dangerous and what could not be checked
    (:class:`Severity` WARNING and NOTE), even when the file has errors, so ``l4lb check`` and
    ``l4lb run`` both say it. ``check_files`` also checks what ``run`` needs from this machine
    (:func:`l4lb.config.preflight.run_issues`: files it writes, bind addresses, capabilities);
    ``l4lb check``, ``l4lb run`` and ``l4lb reload`` ask for it, a running balancer's reload not.
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

    ``warnings`` and ``check_files``: see :func:`load_config`.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(source, [ConfigIssue("", f"TOML syntax error: {err}")]) from err
    issues: list[ConfigIssue] = []
    _walk(raw, schema.Config, "", issues)
    parsed = salvage(raw, [i.path for i in issues])
    parsed = dataclasses.replace(parsed, config=_resolve_paths(parsed.config, base_dir))
    issues += parsed.rule_issues
    issues += crosscheck.cross_checks(parsed)
    issues += preflight.read_issues(parsed)
    if check_files:
        issues += preflight.run_issues(parsed)
    issues += config_warnings(parsed)
    found = _with_lines(text, _unique(issues))
    if warnings is not None:
        warnings += [i for i in found if i.severity is not Severity.ERROR]
    errors = [i for i in found if i.severity is Severity.ERROR]
    if errors:
        raise ConfigError(source, errors)
    return parsed.config


def _unique(issues: list[ConfigIssue]) -> list[ConfigIssue]:
    """Each problem once, even when two rules found it."""
    return list(dict.fromkeys(issues))


def config_warnings(parsed: Parsed) -> list[ConfigIssue]:
    """What a valid file allows but an operator should hear about before it bites."""
    issues: list[ConfigIssue] = []
    config = parsed.config
    for key in ("access", "events"):  # a local syslog socket not there (yet)
        problem = syslog_problem(getattr(config.log, key))
        if problem:
            issues.append(ConfigIssue(f"log.{key}", problem, severity=Severity.WARNING))
    for n, lst in enumerate(parsed.config.listeners):
        if lst.accept_proxy == "off":
            continue
        for j, text in enumerate(lst.trusted_proxies):
            if values.parse_cidr(text)[2] == 0:  # 0.0.0.0/0, ::/0, ::ffff:0:0/96 (IPv4's /0)
                issues.append(
                    ConfigIssue(
                        f"{parsed.listener_path(n)}.trusted_proxies[{j}]",
                        f"{text!r} trusts every address: anyone who can connect can send a PROXY "
                        "header and forge the client address that allow/deny, the limits, the "
                        "logs and the backends see; list only your upstream proxies",
                        severity=Severity.WARNING,
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
        dataclasses.replace(i, line=_locate(lines, headers, i.path)) if i.path else i
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
                if len(rest) > 1 and isinstance(rest[1], int):
                    return _element_line(lines, n, rest[1]) + 1
                return n + 1
        return start + 1 if cut else None
    return None


def _element_line(lines: list[str], n: int, index: int) -> int:
    """The 0-based line where element ``index`` of the array assigned on line ``n`` starts
    (``backends = [`` over several lines); ``n`` when it cannot be told."""
    depth, element, quote = 0, 0, ""
    for row in range(n, len(lines)):
        text = lines[row] if row > n else lines[row].partition("=")[2]
        escaped = False
        for char in text:
            if quote:
                if escaped:
                    escaped = False
                elif char == "\\" and quote == '"':
                    escaped = True
                elif char == quote:
                    quote = ""
                continue
            if char == "#":
                break
            if depth == 1 and element == index and not char.isspace() and char not in ",]":
                return row
            if char in "\"'":
                quote = char
            elif char in "[{":
                depth += 1
            elif char in "]}":
                depth -= 1
                if depth == 0:
                    return n
            elif char == "," and depth == 1:
                element += 1
    return n


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
            issues.append(ConfigIssue(_join(path, key), _unknown_key(key, tp, list(fields))))
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


def _unknown_key(key: str, tp: type[msgspec.Struct], fields: list[str]) -> str:
    """What an unknown key probably is: a key of this table misspelt (difflib's closest), or a
    key (perhaps misspelt) of another table."""
    elsewhere = [k for (table, k) in _BELONGS if table == tp.__name__]
    near = difflib.get_close_matches(key, fields + elsewhere, n=1)
    if tp is not schema.Config and key in _TOP_LEVEL:
        hint = (
            f"{key} is a top-level key: put it above the first [table] (a key after a "
            "[table] header belongs to that table); "
        )
    elif key in elsewhere or (near and near[0] in elsewhere):
        right = key if key in elsewhere else near[0]
        spelt = "" if right == key else f"did you mean {right!r}? "
        hint = f"{spelt}it belongs to {_BELONGS[(tp.__name__, right)]}; "
    else:
        hint = f"did you mean {near[0]!r}? " if near else ""
    return f"unknown key; {hint}valid keys here: {', '.join(fields)}"


def _belongs() -> dict[tuple[str, str], str]:
    """(table type, key) -> where that key goes instead, for keys put in the wrong table."""
    pool = {f.encode_name for f in msgspec.structs.fields(schema.PoolConfig)}
    listener = {f.encode_name for f in msgspec.structs.fields(schema.ListenerConfig)}
    out = {("ListenerConfig", k): "the pool: set it in [pools.NAME]" for k in pool - listener}
    out.update({("PoolConfig", k): "a listener: set it in [[listeners]]" for k in listener - pool})
    return out


_BELONGS = _belongs()
_TOP_LEVEL = frozenset(f.encode_name for f in msgspec.structs.fields(schema.Config))


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
        issues.append(ConfigIssue(path, _leaf_message(value, tp, metas, str(err), what, path)))
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


_DURATION_CHECKS = frozenset(
    {"duration", "positive_duration", "timeout", "check_interval", "resolve_interval"}
)
_BOOLEANS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _base_types(tp: Any) -> set[Any]:
    """The types a value of ``tp`` may have (``Annotated`` and ``| None`` stripped)."""
    inner, _ = _unwrap(tp)
    if typing.get_origin(inner) in (typing.Union, types.UnionType):
        out: set[Any] = set()
        for arg in typing.get_args(inner):
            out |= _base_types(arg)
        return out
    return {inner}


def _leaf_message(
    value: Any, tp: Any, metas: list[msgspec.Meta], raw: str, what: str, path: str = ""
) -> str:
    """Why ``value`` is not a ``tp``, showing the right form where the wrong one is common: a
    number or a boolean in quotes, a duration without quotes and unit, a choice misspelt."""
    key = path.rpartition(".")[2]
    as_key = key if key and not key.endswith("]") and what == "value" else None
    choices = _literal_choices(tp)
    if choices:
        listed = ", ".join(repr(c) for c in choices)
        near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
        hint = f"did you mean {near[0]!r}? " if near and isinstance(value, str) else ""
        return f"invalid {what} {value!r}: {hint}expected one of {listed}"
    allowed = _base_types(tp)
    checks = {(m.extra or {}).get("check") for m in metas}
    if isinstance(value, str) and int in allowed and value.strip().lstrip("-").isdigit():
        right = f"{as_key} = {int(value)}" if as_key else str(int(value))
        return f"invalid {what} {value!r}: a number is written without quotes: {right}"
    if isinstance(value, str) and bool in allowed and value.strip().lower() in _BOOLEANS:
        word = "true" if _BOOLEANS[value.strip().lower()] else "false"
        right = f"{as_key} = {word}" if as_key else word
        return f"invalid {what} {value!r}: a boolean is written without quotes: {right}"
    if isinstance(value, int | float) and not isinstance(value, bool) and checks & _DURATION_CHECKS:
        text = f'"{value:g}s"'
        right = f"{as_key} = {text}" if as_key else text
        return (
            f"invalid {what} {value!r}: a duration is a string with a unit (ms, s, m, h): {right}"
        )
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
    if preflight.access_file(log.access) is not None:
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
