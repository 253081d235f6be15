"""One pass: the rules between tables run on whatever parsed, next to the schema's errors, and
nothing is said twice or cascades from a part that failed (config/partial.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4lb.config import ConfigError, ConfigIssue, load_config, parse_config
from l4lb.config.issues import Severity
from tests.config.test_config import FULL

LISTENER = '[[listeners]]\nname = "{name}"\nbind = "127.0.0.1:{port}"\npool = "{pool}"\n{extra}\n'
POOL = "[pools.{name}]\nbackends = [{backends}]\n{extra}\n"


def listener(name: str, port: int, pool: str, extra: str = "") -> str:
    return LISTENER.format(name=name, port=port, pool=pool, extra=extra)


def pool(name: str, backends: str = '{ address = "127.0.0.1:9001" }', extra: str = "") -> str:
    return POOL.format(name=name, backends=backends, extra=extra)


def issues(text: str) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return info.value.issues


def paths(text: str) -> list[str]:
    return [i.path for i in issues(text)]


def test_a_schema_error_in_one_pool_and_a_dangling_reference_in_another_listener() -> None:
    text = (
        listener("a", 18001, "a")
        + listener("b", 18002, "nope")
        + pool("a", extra='balance = "fastest"')
    )
    found = issues(text)
    assert [(i.path, i.line) for i in found] == [
        ("listeners[1].pool", 9),
        ("pools.a.balance", 13),
    ]
    assert "defined pools: 'a'" in found[0].message


def test_a_listener_with_a_typo_still_has_its_pool_checked() -> None:
    text = listener("a", 18001, "nope", extra="max_con = 5") + pool("a")
    assert paths(text) == ["listeners[0].pool", "listeners[0].max_con"]


def test_a_pool_that_failed_is_no_unknown_pool() -> None:
    """Its own error says what is wrong, once; its listeners get no "no pool" error."""
    text = listener("a", 18001, "a") + pool("a", backends='"127.0.0.1:9001"')
    assert paths(text) == ["pools.a.backends[0]"]
    text = listener("a", 18001, "bad name") + '[pools."bad name"]\nbackends = []\n'
    assert paths(text) == ["pools.bad name", "pools.bad name.backends"]


def test_the_valid_backends_of_a_pool_are_still_checked() -> None:
    backends = (
        '{ address = "127.0.0.1:9001" }, { address = "x:y:z" }, { address = "127.0.0.1:9001" }'
    )
    found = issues(listener("a", 18001, "a") + pool("a", backends=backends))
    assert [i.path for i in found] == ["pools.a.backends[1].address", "pools.a.backends[2].address"]
    assert "duplicate backend '127.0.0.1:9001' (also backends[0])" in found[1].message


def test_a_backend_loop_into_a_listener_next_to_a_schema_error() -> None:
    text = listener("a", 18001, "a") + pool(
        "a", backends='{ address = "127.0.0.1:18001" }', extra="retries = 1000"
    )
    assert paths(text) == ["pools.a.backends[0].address", "pools.a.retries"]


def test_duplicate_names_and_binds_next_to_schema_errors() -> None:
    text = "workers = 0\n" + listener("a", 18001, "a") + listener("a", 18001, "a") + pool("a")
    assert paths(text) == ["workers", "listeners[1].name", "listeners[1].bind"]


def test_rules_that_read_a_failed_key_say_nothing() -> None:
    """workers failed: 'manage needs workers = 1' would be a guess."""
    text = 'workers = "many"\ntransparent_routing = "manage"\n' + listener("a", 18001, "a")
    text += pool("a")
    assert paths(text) == ["workers"]
    # send_proxy failed: "source = 'client' ... send_proxy is 'v2'" would be about the default
    text = listener("a", 18001, "a") + pool("a", extra='source = "client"\nsend_proxy = "v3"')
    assert paths(text) == ["pools.a.send_proxy"]


def test_anycast_does_not_blame_a_listener_that_failed() -> None:
    anycast = (
        '\n[anycast]\nvips = ["127.0.0.1/32"]\nlocal_as = 65001\nrouter_id = "192.0.2.1"\n'
        'neighbors = [{ address = "127.0.0.2", remote_as = 65000 }]\n'
    )
    base = "workers = 1\n" + listener("a", 18001, "a") + pool("a") + anycast
    parse_config(base)  # valid: the listener binds the VIP
    broken = base.replace('bind = "127.0.0.1:18001"', 'bind = "127.0.0.1:x"')
    assert paths(broken) == ["listeners[0].bind"]
    unbound = base.replace('bind = "127.0.0.1:18001"', 'bind = "127.0.0.2:18001"')
    assert paths(unbound) == ["anycast.vips[0]"]


def test_warnings_are_given_with_the_errors() -> None:
    text = listener(
        "a", 18001, "nope", extra='accept_proxy = "required"\ntrusted_proxies = ["::/0"]'
    ) + pool("a")
    warnings: list[ConfigIssue] = []
    with pytest.raises(ConfigError) as info:
        parse_config(text, warnings=warnings)
    assert [i.path for i in info.value.issues] == ["listeners[0].pool"]
    assert [(w.path, w.severity) for w in warnings] == [
        ("listeners[0].trusted_proxies[0]", Severity.WARNING)
    ]


def test_every_error_once() -> None:
    text = listener("a", 18001, "b") + listener("a", 18001, "b") + pool("a")
    found = issues(text)
    assert len(found) == len(set(found))
    assert paths(text) == [
        "listeners[0].pool",
        "listeners[1].name",
        "listeners[1].bind",
        "listeners[1].pool",
    ]


def test_elements_of_an_array_over_several_lines_have_their_own_line() -> None:
    text = (
        listener("a", 18001, "a")
        + "[pools.a]\nbackends = [\n"
        + '  { address = "127.0.0.1:9001" },  # a "]" and a "," in a comment\n'
        + '  { address = "127.0.0.1:9002", weight = "2" },\n'
        + '  { address = "a]b,c" }, { address = "127.0.0.1:9001" },\n'
        + "]\n"
    )
    found = issues(text)
    assert [(i.path, i.line) for i in found] == [
        ("pools.a.backends[1].weight", 9),
        ("pools.a.backends[2].address", 10),
        ("pools.a.backends[3].address", 10),
    ]


def test_a_tables_own_rules_are_checked_next_to_its_key_errors() -> None:
    """accept_proxy without trusted_proxies, in a listener whose bind is wrong: both are said."""
    text = listener("a", 18001, "a", extra='accept_proxy = "required"').replace(
        "18001", "x"
    ) + pool("a", extra='proxy_tlvs = ["alpn", "alpn"]\nretries = -1')
    found = issues(text)
    assert [(i.path, i.line) for i in found] == [
        ("listeners[0]", 1),
        ("listeners[0].bind", 3),
        ("pools.a", 6),
        ("pools.a.retries", 9),
    ]
    assert "needs a non-empty trusted_proxies" in found[0].message
    assert "each TLV may appear only once" in found[2].message


def test_a_rule_that_reads_a_failed_or_misspelt_key_says_nothing() -> None:
    wrong = listener("a", 18001, "a", extra='accept_proxy = "required"\ntrusted_proxies = ["x"]')
    assert paths(wrong + pool("a")) == ["listeners[0].trusted_proxies[0]"]
    typo = listener("a", 18001, "a", extra='accept_proxy = "required"\ntrusted_proxy = ["::1"]')
    assert paths(typo + pool("a")) == ["listeners[0].trusted_proxy"]


def test_the_valid_keys_of_a_top_level_table_are_still_checked(tmp_path: Path) -> None:
    """A misspelt key in [log] does not hide an access log run cannot open."""
    text = f'[log]\naccess = "{tmp_path}/nowhere/a.log"\nformat = "json"\n\n'
    text += listener("a", 18001, "a") + pool("a")
    found = issues_of(tmp_path, text)
    assert [(i.path, i.line) for i in found] == [("log.access", 2), ("log.format", 3)]
    assert f"directory {tmp_path}/nowhere does not exist" in found[0].message


def test_an_admin_bind_that_failed_is_not_compared_with_the_listeners() -> None:
    """The default admin bind (127.0.0.1:9100) standing in for a wrong one is not "also a
    listener's bind"."""
    text = listener("a", 9100, "a") + pool("a") + '[admin]\nbind = "localhost:9100"\n'
    assert paths(text) == ["admin.bind"]
    assert "not an IP address" in issues(text)[0].message


def issues_of(tmp_path: Path, text: str) -> list[ConfigIssue]:
    path = tmp_path / "l4lb.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, check_files=True)
    return info.value.issues


def test_a_fixed_source_with_dns_named_backends_is_no_traceback() -> None:
    """A fixed source address is compared with IP backends only: a name's family is known once
    resolved (it raised ValueError from BackendConfig.addr before)."""
    backends = '{ address = "app.internal:80" }, { address = "[::1]:80" }'
    found = issues(
        listener("a", 18001, "a") + pool("a", backends=backends, extra='source = "127.0.0.1"')
    )
    assert [i.path for i in found] == ["pools.a.source"]
    assert "'[::1]:80' is IPv6" in found[0].message


WRONG_VALUES = [
    '"x"',
    "0",
    "-1",
    '"30"',
    "true",
    '"true"',
    "[]",
    "{}",
    '"127.0.0.1:0"',
    '["a"]',
    "99999999999",
    "1.5",
    '"1d"',
    '[{ address = "x" }]',
    '"::1/200"',
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.sampled_from(WRONG_VALUES)), max_size=5))
def test_any_mix_of_wrong_values_is_reported_each_once_without_a_traceback(
    edits: list[tuple[int, str]],
) -> None:
    """The full example with some values made wrong: errors (each once) or a config, never
    another exception, whatever parsed and whatever did not."""
    lines = FULL.splitlines()
    assignments = [n for n, ln in enumerate(lines) if "=" in ln and not ln.startswith(("[", " "))]
    for pick, value in edits:
        n = assignments[pick % len(assignments)]
        lines[n] = lines[n].split("=")[0] + "= " + value
    try:
        parse_config("\n".join(lines))
    except ConfigError as err:
        assert len(set(err.issues)) == len(err.issues), err.issues
        assert all(i.line is not None for i in err.issues if i.path), err.issues
