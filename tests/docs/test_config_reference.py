"""Every key the config schema accepts is in the README's complete example and in
docs/balancer.md's reference, and every choice of a key with a fixed set of values is named there.

The keys come from ``l4lb.config.schema`` itself (the msgspec structs ``l4lb check`` validates
with), so a key added there without its documentation fails here, naming the key and the place
its line goes.
"""

from __future__ import annotations

import re
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from l4lb.config import schema
from l4lb.config.loader import ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
REFERENCE = ROOT / "docs" / "balancer.md"

SECTIONS = {
    "": "### Top level",
    "log": "### Top level",
    "kernel": "### Top level",
    "admin": "### Top level",
    "listeners": "### `[[listeners]]`",
    "listeners.routes": "### `[[listeners]]`",
    "pools": "### `[pools.NAME]`",
    "pools.backends": "### `[pools.NAME]`",
    "pools.health": "#### `[pools.NAME.health]`",
    "resolver": "#### `[resolver]`",
    "anycast": "### `[anycast]`",
    "anycast.neighbors": "### `[anycast]`",
}
"""Where in docs/balancer.md the keys of each table are described (by its heading)."""


def _structs(tp: Any) -> list[type[msgspec.Struct]]:
    """The structs a field's type holds (``X``, ``X | None``, ``tuple[X, ...]``, a dict of X)."""
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return [tp]
    found = []
    for arg in typing.get_args(tp):
        found += _structs(arg)
    return found


def _choices(tp: Any) -> list[str]:
    """The fixed string values a field takes (its ``Literal``s), if any."""
    if typing.get_origin(tp) is typing.Literal:
        return [a for a in typing.get_args(tp) if isinstance(a, str)]
    found = []
    for arg in typing.get_args(tp):
        found += _choices(arg)
    return found


def schema_keys(
    struct: type[msgspec.Struct] = schema.Config, table: str = ""
) -> Iterator[tuple[str, str, list[str]]]:
    """(table, key, choices) for every key the schema accepts; tables as ``pools.health``."""
    hints = typing.get_type_hints(struct, include_extras=True)
    for field in msgspec.structs.fields(struct):
        key = field.encode_name
        yield table, key, _choices(hints[field.name])
        for inner in _structs(hints[field.name]):
            yield from schema_keys(inner, f"{table}.{key}" if table else key)


KEYS = sorted(set((t, k) for t, k, _ in schema_keys()))


def _path(table: str, key: str) -> str:
    return f"{table}.{key}" if table else key


def _example_keys(value: Any, table: str = "") -> set[tuple[str, str]]:
    """(table, key) of every key in a parsed TOML example, pools by name folded into ``pools``."""
    found: set[tuple[str, str]] = set()
    if isinstance(value, list):
        for item in value:
            found |= _example_keys(item, table)
        return found
    if not isinstance(value, dict):
        return found
    for key, inner in value.items():
        found.add((table, key))
        if not table and key == "pools" and isinstance(inner, dict):  # [pools.NAME]: no key
            for pool in inner.values():
                found |= _example_keys(pool, "pools")
        else:
            found |= _example_keys(inner, _path(table, key))
    return found


def readme_example() -> dict[str, Any]:
    """The README's complete example: the first ``toml`` block of its Configuration section."""
    text = README.read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```toml\n(.*?)```", section, re.S)
    assert block, "README.md's Configuration section has no ```toml example"
    return tomllib.loads(block.group(1))


def section(heading: str) -> str:
    """The text under ``heading`` in docs/balancer.md, up to the next heading of its level or
    higher (its subsections included)."""
    text = REFERENCE.read_text()
    assert f"\n{heading}\n" in text, f"docs/balancer.md has no heading {heading!r}"
    body = text.split(f"\n{heading}\n", 1)[1]
    level = len(heading) - len(heading.lstrip("#"))
    end = re.search(rf"^#{{1,{level}}} ", body, re.M)
    return body[: end.start()] if end else body


def _in_code(word: str, text: str) -> bool:
    """``word`` stands in a code span of ``text``: `` `word` ``, `` `word = 1` ``, ``{ word, }``."""
    return any(
        re.search(rf"(?<![\w.-]){re.escape(word)}(?![\w-])", span)
        for span in re.findall(r"`([^`]+)`", text)
    )


def test_the_schema_walk_finds_the_keys() -> None:
    """The walk itself sees nested tables, arrays of tables and keyed tables."""
    assert ("", "relay") in KEYS and ("listeners.routes", "sni") in KEYS
    assert ("pools.backends", "address") in KEYS and ("pools.health", "http_method") in KEYS
    assert ("anycast.neighbors", "remote_as") in KEYS and ("log", "access") in KEYS
    new = sorted({t for t, _ in KEYS} - set(SECTIONS))
    assert not new, (
        f"new config tables {new}: add each to SECTIONS in tests/docs/test_config_reference.py "
        "with the docs/balancer.md heading that describes its keys"
    )


def test_the_readme_example_shows_every_key() -> None:
    shown = _example_keys(readme_example())
    missing = [_path(t, k) for t, k in KEYS if (t, k) not in shown]
    assert not missing, (
        "README.md's complete example (## Configuration) lacks these keys of "
        f"src/l4lb/config/schema.py; add a line for each: {', '.join(missing)}"
    )
    unknown = sorted(_path(t, k) for t, k in shown - set(KEYS))
    assert not unknown, f"README.md's example has keys the schema refuses: {unknown}"


@pytest.mark.parametrize("table", sorted(set(SECTIONS)))
def test_the_reference_describes_every_key(table: str) -> None:
    heading = SECTIONS[table]
    text = section(heading)
    missing = [k for t, k in KEYS if t == table and not _in_code(k, text)]
    where = f"[{table}]" if table else "the top level"
    assert not missing, (
        f"docs/balancer.md, under {heading!r}, does not describe these keys of {where}: "
        f"{', '.join(f'`{k}`' for k in missing)} (add a row to the table, key in backticks)"
    )


def test_the_reference_names_every_choice() -> None:
    """A fixed set of values (``relay``, ``balance``, ``send_proxy``, ``check``...): each value is
    named in the key's section, so a new one (a new relay) comes with its line."""
    missing = []
    for table, key, choices in schema_keys():
        if table not in SECTIONS:  # a new table: test_the_schema_walk_finds_the_keys says so
            continue
        text = section(SECTIONS[table])
        missing += [f"{_path(table, key)} = {c!r}" for c in choices if not _in_code(c, text)]
    assert not missing, (
        "docs/balancer.md does not name these values the schema accepts (in the key's row, in "
        f"backticks): {', '.join(missing)}"
    )


def test_a_missing_key_is_named() -> None:
    """The check can fail, and says which key: a reference without the `relay` row."""
    text = section("### Top level").replace("`relay`", "relay")
    assert not _in_code("relay", text)
    assert _in_code("relay", "| `relay` | `splice` |") and _in_code("sni", "`{ sni, alpn }`")
    assert not _in_code("sni", "`tls_sni`") and not _in_code("name", "`names`")


def test_the_readme_example_is_a_valid_config(tmp_path: Path) -> None:
    """``l4lb check``'s rules hold for the example, but for what depends on the machine: its
    paths are put under ``tmp_path`` and the system CA file, and the VIP on no local interface
    here is the only issue left."""
    text = README.read_text().split("\n## Configuration\n", 1)[1]
    block = re.search(r"```toml\n(.*?)```", text, re.S)
    assert block
    example = block.group(1)
    for path in ("/var/log/l4lb/access.log", "/var/lib/l4lb/state.json"):
        example = example.replace(path, str(tmp_path / Path(path).name))
    example = example.replace("/etc/l4lb/ca.pem", "/etc/ssl/certs/ca-certificates.crt")
    (tmp_path / "deny.txt").write_text("# none\n")
    try:
        parse_config(example, base_dir=tmp_path)
    except ConfigError as err:
        issues = [str(issue) for issue in err.issues if not issue.path.startswith("anycast.vips")]
        assert not issues, issues
