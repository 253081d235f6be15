"""The config schema and loader: valid files load, every invalid one names its key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from l4lb.config import ConfigError, load_config, parse_config
from l4lb.config.values import parse_duration, parse_hostport, parse_rate

BASE = """
[[listeners]]
name = "web"
bind = "127.0.0.1:8443"
pool = "web"

[pools.web]
backends = [{ address = "127.0.0.1:9001" }, { address = "127.0.0.1:9002", weight = 2 }]
"""

FULL = """
workers = 1
drain_timeout = "10s"
relay = "stream"

[log]
access = "access.log"

[admin]
bind = "127.0.0.1:9100"
token = "secret"

[[listeners]]
name = "edge"
bind = "[::1]:8443"
pool = "web"
max_conns = 500
accept_proxy = "required"
trusted_proxies = ["127.0.0.1/32", "::1"]
proxy_header_timeout = "2s"
pass_tlvs = ["unique_id", "authority", 0xEA]
allow = ["0.0.0.0/0", "::/0"]
deny = ["203.0.113.0/24"]
max_conns_per_client = 100
new_conns_per_client = "50/s"
new_conns_burst = 80
client_v6_prefix = 56
max_pending_headers = 200

[pools.web]
balance = "maglev"
send_proxy = "v2"
proxy_tlvs = ["unique_id", "authority", "alpn", "crc32c", "noop"]
tls_peek_timeout = "150ms"
connect_timeout = "1.5s"
idle_timeout = "10m"
retries = 3
backends = [
  { address = "127.0.0.1:9001", weight = 2, max_conns = 1000 },
  { address = "[::1]:9002", weight = 0 },
]

[pools.web.health]
check = "send-expect"
interval = "2s"
timeout = "1s"
rise = 2
fall = 3
send = "PING\\r\\n"
expect = "PONG"
"""


def test_full_example_loads_with_compiled_forms(tmp_path: Path) -> None:
    path = tmp_path / "l4lb.toml"
    path.write_text(FULL)
    config = load_config(path)
    listener = config.listeners[0]
    pool = config.pools["web"]
    assert listener.bind_addr == ("::1", 8443)
    assert listener.pass_tlv_types == frozenset({0x05, 0x02, 0xEA})
    assert listener.new_conns_rate == 50.0
    assert listener.new_conns_burst_size == 80
    assert [str(n) for n in listener.trusted_nets] == ["127.0.0.1/32", "::1/128"]
    assert pool.connect_timeout_s == 1.5
    assert pool.tls_peek_timeout_s == pytest.approx(0.15)
    assert pool.idle_timeout_s == 600.0
    assert pool.peeks_tls
    assert pool.backends[1].addr == ("::1", 9002)
    assert config.drain_timeout_s == 10.0
    assert config.log.access == str(tmp_path / "access.log")  # relative to the config file
    assert config.admin is not None and config.admin.token == "secret"
    assert pool.health is not None and pool.health.send == "PING\r\n"


def test_defaults() -> None:
    config = parse_config(BASE)
    assert config.workers >= 1
    assert config.relay == "splice"  # issue 16: the cheaper relay is the default
    assert config.admin is None
    assert config.listeners[0].defer_accept_s == 0  # off: server-speaks-first must work
    assert config.log.access == "stdout"
    lst = config.listeners[0]
    assert (lst.max_conns, lst.accept_proxy, lst.client_v6_prefix) == (10000, "off", 64)
    pool = config.pools["web"]
    assert (pool.balance, pool.send_proxy, pool.retries) == ("roundrobin", "v2", 2)
    assert (pool.connect_timeout_s, pool.idle_timeout_s) == (3.0, 600.0)


def test_frozen() -> None:
    config = parse_config(BASE)
    with pytest.raises(AttributeError):
        config.workers = 3  # type: ignore[misc]


def _with(extra_top: str = "", listener: str = "", pool: str = "", tail: str = "") -> str:
    text = BASE.replace('pool = "web"\n', f'pool = "web"\n{listener}\n', 1)
    text = text.replace("[pools.web]\n", f"[pools.web]\n{pool}\n")
    return extra_top + "\n" + text + "\n" + tail


# (config text, key path expected, fragment of the message)
BAD = [
    (_with("workers = 0"), "workers", ">= 1"),
    (_with('drain_timeout = "30 sec"'), "drain_timeout", "write '30s'"),
    (_with('relay = "fast"'), "relay", "'stream', 'splice'"),
    (_with(tail="[kernel]\nhandover_exchanges = -1"), "kernel.handover_exchanges", ">= 0"),
    (_with(tail='[kernel]\nhandover_after = "1 sec"'), "kernel.handover_after", "write '1s'"),
    (_with("typo = 1"), "typo", "unknown key"),
    (_with(listener="bnd = 1"), "listeners[0].bnd", "did you mean 'bind'"),
    (_with(listener='accept_proxy = "maybe"'), "listeners[0].accept_proxy", "'optional'"),
    (_with(listener='accept_proxy = "required"'), "listeners[0]", "trusted_proxies"),
    (_with(listener='allow = ["10.0.0.1/8"]'), "listeners[0].allow[0]", "10.0.0.0/8"),
    (_with(listener='deny = ["nope"]'), "listeners[0].deny[0]", "invalid CIDR"),
    (_with(listener="pass_tlvs = [256]"), "listeners[0].pass_tlvs[0]", "0..255"),
    (_with(listener='pass_tlvs = ["bogus"]'), "listeners[0].pass_tlvs[0]", "unique_id"),
    (_with(listener='new_conns_per_client = "5"'), "listeners[0].new_conns_per_client", "50/s"),
    (_with(listener="new_conns_burst = 5"), "listeners[0]", "new_conns_per_client"),
    (_with(listener="client_v6_prefix = 129"), "listeners[0].client_v6_prefix", "<= 128"),
    (_with(listener='deny_file = "missing.txt"'), "listeners[0].deny_file", "no such file"),
    (_with(listener="max_conns = 0"), "listeners[0].max_conns", ">= 1"),
    (_with(pool='balance = "rr"'), "pools.web.balance", "'maglev'"),
    (_with(pool='send_proxy = "v3"'), "pools.web.send_proxy", "'v1', 'v2'"),
    (_with(pool='proxy_tlvs = ["ssl"]'), "pools.web.proxy_tlvs[0]", "'unique_id'"),
    (_with(pool='send_proxy = "v1"\nproxy_tlvs = ["unique_id"]'), "pools.web.proxy_tlvs", "v2"),
    (_with(pool='proxy_tlvs = ["noop", "noop"]'), "pools.web", "only once"),
    (_with(pool='connect_timeout = "3"'), "pools.web.connect_timeout", "unit"),
    (_with(pool="retries = -1"), "pools.web.retries", ">= 0"),
    (_with(tail='[pools.web.health]\ncheck = "send-expect"'), "pools.web.health", "'expect'"),
    (_with(tail='[pools.web.health]\ncheck = "ping"'), "pools.web.health.check", "'tcp'"),
    (_with(tail="[pools.web.health]\nrise = 0"), "pools.web.health.rise", ">= 1"),
    (_with(tail='[pools.web.health]\nhttp_path = "x"'), "pools.web.health.http_path", "'/'"),
    (_with(tail='[admin]\nbind = "localhost:9100"'), "admin.bind", "not an IP"),
    (_with(tail="[log]\nacess = 1"), "log.acess", "did you mean 'access'"),
    (BASE.replace('pool = "web"', 'pool = "wbe"'), "listeners[0].pool", "defined pools: 'web'"),
    (
        BASE.replace("127.0.0.1:9002", "127.0.0.1:9001"),
        "pools.web.backends[1].address",
        "duplicate",
    ),
    (
        BASE.replace("127.0.0.1:9002", "127.0.0.1:99999"),
        "pools.web.backends[1].address",
        "1..65535",
    ),
    (BASE.replace("127.0.0.1:9002", "::1:9002"), "pools.web.backends[1].address", "brackets"),
    (BASE.replace("weight = 2", "weight = 1001"), "pools.web.backends[1].weight", "<= 1000"),
    (BASE.replace("weight = 2", "weight = 'x'"), "pools.web.backends[1].weight", "int"),
    (
        BASE.replace(
            "backends = [", "backends = [{ address = '127.0.0.1:1', send_proxy = 'v1' },"
        ).replace("[pools.web]", "[pools.web]\nproxy_tlvs = ['unique_id']"),
        "pools.web.backends[0].send_proxy",
        "cannot carry",
    ),
    (BASE + BASE.split("[pools.web]")[0].replace("8443", "8444"), "listeners[1].name", "duplicate"),
    (
        BASE + BASE.split("[pools.web]")[0].replace('"web"', '"b"', 1),
        "listeners[1].bind",
        "already",
    ),
    (BASE.replace("[pools.web]", '[pools."bad name"]'), "pools.bad name", "letters"),
    ("listeners = []\n[pools]\n", "listeners", "length >= 1"),
    ("[[listeners]\n", "", "TOML syntax error"),
    ("", "listeners", "missing"),
]


@pytest.mark.parametrize(("text", "path", "fragment"), BAD)
def test_bad_config_names_key(text: str, path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="x.toml")
    issues = info.value.issues
    assert any(i.path == path and fragment in i.message for i in issues), issues


def test_every_error_is_listed() -> None:
    text = _with("workers = 0", listener='accept_proxy = "nope"', pool='balance = "rr"')
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    paths = {i.path for i in info.value.issues}
    assert {"workers", "listeners[0].accept_proxy", "pools.web.balance"} <= paths


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("1.5s", 1.5), ("10m", 600.0), ("2h", 7200.0), ("0s", 0.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "5 sec", "-1s", "1d", "s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_addresses_and_rates() -> None:
    assert parse_hostport("[::1]:8443") == ("::1", 8443)
    assert parse_hostport("10.0.0.1:1") == ("10.0.0.1", 1)
    assert parse_rate("100/m") == pytest.approx(100 / 60)
    for bad in ["127.0.0.1", "[::1]8443", "127.0.0.1:0", "127.0.0.1:+80", "[127.0.0.1]:80"]:
        with pytest.raises(ValueError):
            parse_hostport(bad)


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "l4lb", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_command(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(BASE)
    result = _check(good)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text(_with("workers = 0", pool='balance = "rr"'))
    result = _check(bad)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert str(bad) in result.stderr
    assert "workers: invalid value 0" in result.stderr
    assert "Expected `int` >= 1 (line 1)" in result.stderr  # the file line of the key
    assert "pools.web.balance: invalid value 'rr'" in result.stderr

    result = _check(tmp_path / "missing.toml")
    assert result.returncode == 1
    assert "cannot read" in result.stderr and "Traceback" not in result.stderr

    usage = subprocess.run(
        [sys.executable, "-m", "l4lb", "check"], capture_output=True, text=True, timeout=60
    )
    assert usage.returncode == 2


def test_references_reported_alongside_key_errors() -> None:
    text = _with("workers = 0").replace('pool = "web"', 'pool = "wbe"', 1)
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    paths = {i.path for i in info.value.issues}
    assert {"workers", "listeners[0].pool"} <= paths


def test_issues_carry_file_lines() -> None:
    text = FULL.replace('balance = "maglev"', 'balance = "rr"').replace("rise = 2", "rise = 0")
    text = text.replace('bind = "[::1]:8443"', 'bind = "nowhere"')
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    lines = text.splitlines()
    for issue in info.value.issues:
        assert issue.line is not None, issue
        key = issue.path.rpartition(".")[2]
        assert lines[issue.line - 1].startswith(key), (issue, lines[issue.line - 1])


# -- An operator's mistakes caught by ``l4lb check`` (the real command) before they reach a run.


CHECK_BASE = """
[[listeners]]
name = "web"
bind = "127.0.0.1:8443"
pool = "web"
{listener}
[pools.web]
backends = [{{ address = "127.0.0.1:9001" }}]
{pool}
{tail}
"""


def _check_text(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "l4lb.toml"
    path.write_text(text)
    return _check(path)


def _check_config(listener: str = "", pool: str = "", tail: str = "") -> str:
    return CHECK_BASE.format(listener=listener, pool=pool, tail=tail)


# (config, key path, what the message must say): zero timeouts would fail every connect, close
# every connection at the first sweep, or run health checks in a busy loop.
ZERO_OR_EMPTY = [
    (
        _check_config(pool='connect_timeout = "0s"'),
        "pools.web.connect_timeout",
        "greater than zero",
    ),
    (_check_config(pool='idle_timeout = "0ms"'), "pools.web.idle_timeout", "greater than zero"),
    (
        _check_config(listener='proxy_header_timeout = "0h"'),
        "listeners[0].proxy_header_timeout",
        "greater than zero",
    ),
    (
        _check_config(tail='[pools.web.health]\ninterval = "0s"'),
        "pools.web.health.interval",
        "greater than zero",
    ),
    (
        _check_config(tail='[pools.web.health]\ntimeout = "0.0s"'),
        "pools.web.health.timeout",
        "greater than zero",
    ),
    (
        _check_config(tail='[log]\naccess = ""'),
        "log.access",
        "'stdout', 'off', a file path or a syslog target",
    ),
]


@pytest.mark.parametrize(("text", "key", "hint"), ZERO_OR_EMPTY)
def test_check_refuses_zero_timeouts_and_empty_access_log(
    tmp_path: Path, text: str, key: str, hint: str
) -> None:
    result = _check_text(tmp_path, text)
    assert result.returncode == 1, result
    assert "Traceback" not in result.stdout + result.stderr
    out = result.stdout + result.stderr
    line = next(ln for ln in out.splitlines() if ln.strip().startswith(key + ":"))
    assert hint in line


@pytest.mark.parametrize(
    "text",
    [
        'drain_timeout = "0s"\n' + _check_config(),
        _check_config(pool='tls_peek_timeout = "0s"'),
    ],
)
def test_zero_is_still_fine_where_it_means_do_not_wait(tmp_path: Path, text: str) -> None:
    result = _check_text(tmp_path, text)
    assert result.returncode == 0, result.stdout + result.stderr


def _pointing(bind: str, backend: str) -> str:
    return f"""
[[listeners]]
name = "front"
bind = "{bind}"
pool = "web"

[pools.web]
backends = [{{ address = "10.0.0.1:80" }}, {{ address = "{backend}" }}]
"""


@pytest.mark.parametrize(
    ("bind", "backend", "loops"),
    [
        ("127.0.0.1:8080", "127.0.0.1:8080", True),
        ("0.0.0.0:8080", "127.0.0.1:8080", True),
        ("0.0.0.0:8080", "127.0.0.5:8080", True),  # all of 127/8 is this machine
        ("[::]:8080", "127.0.0.1:8080", True),  # dual-stack
        ("[::]:8080", "[::1]:8080", True),
        ("[::1]:8080", "[::1]:8080", True),
        ("0.0.0.0:8080", "[::1]:8080", False),
        ("0.0.0.0:8080", "10.0.0.2:8080", False),  # another host on the same port: common
        ("127.0.0.1:8080", "127.0.0.1:8081", False),
        ("127.0.0.1:8080", "127.0.0.2:8080", False),
    ],
)
def test_backend_that_is_the_balancer_itself(
    tmp_path: Path, bind: str, backend: str, loops: bool
) -> None:
    """A backend at a listener's own address would make every connection open another."""
    result = _check_text(tmp_path, _pointing(bind, backend))
    out = result.stdout + result.stderr
    assert "Traceback" not in out
    if not loops:
        assert result.returncode == 0, out
        return
    assert result.returncode == 1, out
    line = next(ln for ln in out.splitlines() if "pools.web.backends[1].address:" in ln)
    assert "own listener 'front'" in line and "loop" in line
