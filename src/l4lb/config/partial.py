"""What parsed: a :class:`~l4lb.config.schema.Config` made of the parts of a file that are valid.

The schema pass reports every key that is wrong; the rules that span tables (a listener's pool
exists, binds are unique, the files the config names can be read) then run on whatever else
parsed, so one run of ``l4lb check`` says everything. A part that failed is left out, never
guessed at: its own errors say what is wrong, once, and nothing that refers to it cascades (a pool
that failed still counts as defined, so its listeners get no "no pool" error).
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from l4lb.config import schema
from l4lb.config.issues import ConfigIssue

__all__ = ["Parsed", "salvage"]

_BACKEND = re.compile(r"^\.backends\[(\d+)\]")


@dataclass(frozen=True, slots=True)
class Parsed:
    """The valid parts of a file, with where each came from.

    ``config.listeners[n]`` is the file's ``listeners[listener_at[n]]`` and
    ``config.pools[p].backends[n]`` its ``pools.p.backends[backend_at[p][n]]``. ``pool_names`` is
    every pool the file defines, valid or not (None when ``pools`` is not a table: unknown).
    ``failed`` holds the key paths the schema pass reported: a failed optional key is left out
    (its default stands in), and a rule that reads one asks :meth:`valid` and says nothing.
    ``all_listeners`` is False when a listener could not be built.
    """

    config: schema.Config
    listener_at: tuple[int, ...]
    backend_at: Mapping[str, tuple[int, ...]]
    pool_names: frozenset[str] | None
    failed: frozenset[str]
    all_listeners: bool
    rule_issues: tuple[ConfigIssue, ...] = ()
    """What a table's own rules (``__post_init__``) say about a table built from its valid keys
    (the schema pass only runs them on a table without errors)."""

    def valid(self, path: str) -> bool:
        """True when no error was reported at ``path``, below it or above it."""
        return not _under(self.failed, path)

    def listener_path(self, n: int) -> str:
        return f"listeners[{self.listener_at[n]}]"

    def backend_path(self, pool: str, n: int) -> str:
        return f"pools.{pool}.backends[{self.backend_at[pool][n]}]"


def _under(paths: Iterable[str], prefix: str) -> list[str]:
    """The paths at ``prefix``, below it, or above it (an error on a table covers its keys)."""
    below = (prefix + ".", prefix + "[")
    return [
        p
        for p in paths
        if not p or p == prefix or p.startswith(below) or prefix.startswith((p + ".", p + "["))
    ]


_STAND_IN: dict[str, Any] = {
    "name": "stand-in",
    "bind": "127.0.0.1:1",
    "pool": "stand-in",
    "address": "127.0.0.1:1",
    "backends": [{"address": "127.0.0.1:1"}],
}
"""Valid values for the required keys of the tables, put in for a required key that failed so
the table's own rules can still be run on its other keys (the table itself is not kept)."""


def _convert(
    item: dict[str, Any], kept: dict[str, Any], tp: Any, path: str, rules: list[ConfigIssue]
) -> Any:
    """The table ``item`` at ``path`` built from its ``kept`` keys, or None when a required key
    failed or the table's own rules refuse it. Their message is added to ``rules`` unless it names
    a key that was left out: that rule read a default standing in for a failed key."""
    fields = [f.encode_name for f in msgspec.structs.fields(tp)]
    left_out = [k for k in item if kept.get(k, _MISSING) is _MISSING]
    for key in item:  # a misspelt key stands for the key it was meant to be
        if key not in fields:
            left_out += difflib.get_close_matches(key, fields, n=1)
    missing = [k for k, v in kept.items() if v is _MISSING]
    if any(k not in _STAND_IN for k in missing):
        return None
    try:
        table = msgspec.convert({**kept, **{k: _STAND_IN[k] for k in missing}}, tp)
    except msgspec.ValidationError as err:
        message, sep, where = str(err).rpartition(" - at `$")
        if not sep:  # an error of the table itself
            message, where = str(err), ""
        if not any(re.search(rf"\b{re.escape(k)}\b", message) for k in left_out):
            rules.append(ConfigIssue(path + where.rstrip("`"), message))
        return None
    except (ValueError, TypeError):
        return None
    return None if missing else table


def salvage(raw: dict[str, Any], failed: list[str]) -> Parsed:
    """The :class:`Parsed` parts of the TOML document ``raw``; ``failed`` are the key paths the
    schema pass reported."""
    raw_listeners = raw.get("listeners")
    raw_pools = raw.get("pools")
    pool_names = frozenset(raw_pools) if isinstance(raw_pools, dict) else None
    if not failed:
        config = msgspec.convert(raw, schema.Config)
        return Parsed(
            config,
            tuple(range(len(config.listeners))),
            {name: tuple(range(len(p.backends))) for name, p in config.pools.items()},
            pool_names,
            frozenset(),
            True,
        )
    rules: list[ConfigIssue] = []
    kwargs: dict[str, Any] = {}
    for field in msgspec.structs.fields(schema.Config):
        key = field.encode_name
        if key in ("listeners", "pools") or key not in raw:
            continue
        table = _table_type(field.type)
        if table is not None:  # [log], [admin], [resolver], [anycast]: their valid keys
            value = _salvage_table(raw[key], table, key, failed, rules)
        elif not _under(failed, key):
            value = _convert_value(raw[key], field.type)
        else:
            value = None
        if value is not None:
            kwargs[key] = value
    listeners: list[schema.ListenerConfig] = []
    listener_at: list[int] = []
    if isinstance(raw_listeners, list):
        for i, item in enumerate(raw_listeners):
            listener = _salvage_table(item, schema.ListenerConfig, f"listeners[{i}]", failed, rules)
            if listener is not None:
                listeners.append(listener)
                listener_at.append(i)
    all_listeners = isinstance(raw_listeners, list) and len(listeners) == len(raw_listeners)
    pools: dict[str, schema.PoolConfig] = {}
    backend_at: dict[str, tuple[int, ...]] = {}
    for name, item in raw_pools.items() if isinstance(raw_pools, dict) else ():
        pool = _salvage_pool(name, item, failed, rules)
        if pool is not None:
            pools[name], backend_at[name] = pool
    config = schema.Config(listeners=tuple(listeners), pools=pools, **kwargs)
    return Parsed(
        config,
        tuple(listener_at),
        backend_at,
        pool_names,
        frozenset(failed),
        all_listeners,
        tuple(rules),
    )


def _table_type(tp: Any) -> Any:
    """The Struct type of a table-valued key (``T`` or ``T | None``), else None."""
    options = (
        typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    )
    for option in options:
        if isinstance(option, type) and issubclass(option, msgspec.Struct):
            return option
    return None


def _convert_value(value: Any, tp: Any) -> Any:
    try:
        return msgspec.convert(value, tp)
    except (msgspec.ValidationError, ValueError, TypeError):
        return None


def _valid_keys(item: dict[str, Any], tp: Any, path: str, failed: list[str]) -> dict[str, Any]:
    """The keys of the table ``item`` that are known and hold no error (``_MISSING`` marks a
    required key that failed: without it the table cannot be built)."""
    fields = {f.encode_name: f for f in msgspec.structs.fields(tp)}
    kept: dict[str, Any] = {}
    for key, value in item.items():
        field = fields.get(key)
        if field is None:
            continue  # an unknown key: reported, and nothing reads it
        if _under(failed, f"{path}.{key}" if path else key):
            if field.required:
                kept[key] = _MISSING
            continue
        kept[key] = value
    return kept


_MISSING = object()


def _salvage_table(
    item: Any, tp: Any, path: str, failed: list[str], rules: list[ConfigIssue]
) -> Any:
    """The table at ``path`` built from its valid keys (the defaults stand in for the others),
    or None when a required key failed or the table's own rules refuse what is left."""
    if not isinstance(item, dict) or any(
        p == path or not p or path.startswith((p + ".", p + "[")) for p in failed
    ):
        return None
    return _convert(item, _valid_keys(item, tp, path, failed), tp, path, rules)


def _salvage_pool(
    name: str, item: Any, failed: list[str], rules: list[ConfigIssue]
) -> tuple[schema.PoolConfig, tuple[int, ...]] | None:
    """The pool built from its valid keys and valid backends, with the file index of each."""
    path = f"pools.{name}"
    backends = item.get("backends") if isinstance(item, dict) else None
    if not isinstance(backends, list) or any(
        p in (path, f"{path}.backends") or not p or path.startswith((p + ".", p + "["))
        for p in failed
    ):
        return None
    bad = set()
    for p in _under(failed, f"{path}.backends"):
        m = _BACKEND.match(p[len(path) :])
        if m is not None:
            bad.add(int(m.group(1)))
    kept_at = tuple(j for j in range(len(backends)) if j not in bad)
    rest = {k: v for k, v in item.items() if k != "backends"}
    kept = _valid_keys(rest, schema.PoolConfig, path, failed)
    if not kept_at:
        return None
    kept["backends"] = [backends[j] for j in kept_at]
    pool = _convert(item, kept, schema.PoolConfig, path, rules)
    return None if pool is None else (pool, kept_at)
