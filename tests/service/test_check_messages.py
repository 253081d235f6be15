"""``l4lb check`` says what is wrong and shows the right form, in one pass, in file order; and
``l4lb run`` refuses every file check refuses, with the same messages. The command itself, over
files (subprocesses, as an operator and systemd's ExecStartPre run it)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


def _l4lb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "l4lb", *args], capture_output=True, text=True, timeout=60
    )


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return _l4lb("check", *args)


def _errors(stderr: str) -> list[str]:
    """The error lines of a refused file (the lines under 'FILE: N errors')."""
    return [ln.strip() for ln in stderr.splitlines() if ln.startswith("  ")]


LISTENER = '[[listeners]]\nname = "a"\nbind = "127.0.0.1:18080"\npool = "p"\n'
POOL = '\n[pools.p]\nbackends = [{ address = "127.0.0.1:9" }]\n'

# (id, file, key path, line, the right form the message must show)
MESSAGES = [
    (
        "bind-without-ip",
        LISTENER.replace("127.0.0.1:18080", ":443") + POOL,
        "listeners[0].bind",
        3,
        "write '0.0.0.0:443' (IPv4) or '[::]:443' (IPv6)",
    ),
    (
        "ipv4-octet-over-255",
        LISTENER.replace("127.0.0.1:18080", "10.0.0.300:80") + POOL,
        "listeners[0].bind",
        3,
        "'10.0.0.300' is not an IP address (IPv4 is four numbers 0..255 separated by dots)",
    ),
    (
        "backend-as-a-string",
        LISTENER + '\n[pools.p]\nbackends = ["127.0.0.1:1"]\n',
        "pools.p.backends[0]",
        7,
        "write { address = '127.0.0.1:1' }",
    ),
    (
        "single-brackets-listeners",
        LISTENER.replace("[[listeners]]", "[listeners]") + POOL,
        "listeners",
        1,
        "write [[listeners]] (double brackets) before each entry",
    ),
    (
        "pool-key-on-a-listener",
        LISTENER + 'idle_timeout = "5s"\n' + POOL,
        "listeners[0].idle_timeout",
        5,
        "it belongs to the pool: set it in [pools.NAME]",
    ),
    (
        "misspelt-key",
        LISTENER + "max_con = 100\n" + POOL,
        "listeners[0].max_con",
        5,
        "did you mean 'max_conns'?",
    ),
    (
        "misspelt-pool-key-on-a-listener",
        LISTENER + 'idle_timout = "5s"\n' + POOL,
        "listeners[0].idle_timout",
        5,
        "did you mean 'idle_timeout'? it belongs to the pool",
    ),
    (
        "top-level-key-under-a-table",
        LISTENER + POOL + "workers = 2\n",
        "pools.p.workers",
        8,
        "workers is a top-level key: put it above the first [table]",
    ),
    (
        "duration-without-unit",
        LISTENER + POOL + 'idle_timeout = "30"\n',
        "pools.p.idle_timeout",
        8,
        "the unit is missing: write '30s'",
    ),
    (
        "duration-wrong-unit",
        LISTENER + POOL + 'connect_timeout = "5sec"\n',
        "pools.p.connect_timeout",
        8,
        "unknown unit 'sec': write '5s'",
    ),
    (
        "duration-in-days",
        LISTENER + POOL + 'tcp_keepalive = "1d"\n',
        "pools.p.tcp_keepalive",
        8,
        "write '24h'",
    ),
    (
        "duration-as-a-number",
        LISTENER + POOL + "idle_timeout = 30\n",
        "pools.p.idle_timeout",
        8,
        'idle_timeout = "30s"',
    ),
    (
        "number-as-a-string",
        LISTENER + 'max_conns = "100"\n' + POOL,
        "listeners[0].max_conns",
        5,
        "a number is written without quotes: max_conns = 100",
    ),
    (
        "boolean-as-a-string",
        LISTENER + '\n[pools.p]\nbackends = [{ address = "127.0.0.1:9", backup = "true" }]\n',
        "pools.p.backends[0].backup",
        7,
        "a boolean is written without quotes: backup = true",
    ),
    (
        "unknown-algorithm",
        LISTENER + POOL + 'balance = "round-robin"\n',
        "pools.p.balance",
        8,
        "did you mean 'roundrobin'? expected one of 'roundrobin', 'leastconn', 'random2', 'maglev'",
    ),
    (
        "port-out-of-range",
        LISTENER.replace("18080", "70000") + POOL,
        "listeners[0].bind",
        3,
        "port 70000 is out of range: port must be 1..65535, such as '127.0.0.1:8443'",
    ),
    (
        "backend-port-out-of-range",
        LISTENER + '\n[pools.p]\nbackends = [{ address = "127.0.0.1:0" }]\n',
        "pools.p.backends[0].address",
        7,
        "port 0 is out of range: port must be 1..65535",
    ),
    (
        "dangling-pool",
        LISTENER.replace('pool = "p"', 'pool = "q"') + POOL,
        "listeners[0].pool",
        4,
        "no pool 'q'; defined pools: 'p'",
    ),
]


@pytest.mark.parametrize(
    ("text", "path", "line", "right"), [m[1:] for m in MESSAGES], ids=[m[0] for m in MESSAGES]
)
def test_each_wrong_form_gets_the_right_one(
    tmp_path: Path, text: str, path: str, line: int, right: str
) -> None:
    file = tmp_path / "bad.toml"
    file.write_text(text)
    done = _check(str(file))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    (error,) = _errors(done.stderr)
    assert error.startswith(f"{path}: "), error
    assert right in error, error
    assert error.endswith(f"(line {line})"), error


@pytest.mark.parametrize("text", [m[1] for m in MESSAGES], ids=[m[0] for m in MESSAGES])
def test_run_refuses_what_check_refuses_with_the_same_message(tmp_path: Path, text: str) -> None:
    file = tmp_path / "bad.toml"
    file.write_text(text)
    checked = _check(str(file))
    ran = _l4lb("run", "--config", str(file))
    assert checked.returncode == ran.returncode == 1, ran.stderr
    assert _errors(ran.stderr) == _errors(checked.stderr), ran.stderr
    assert "Traceback" not in ran.stderr


MANY = """\
workers = "2"

[log]
access = "{missing}/access.log"

[[listeners]]
name = "a"
bind = "127.0.0.1:18081"
pool = "web"
deny_file = "deny.txt"

[[listeners]]
name = "a"
bind = "127.0.0.1:18082"
pool = "wbe"
idle_timeout = "10s"

[pools.web]
balance = "least-conn"
backends = [
  {{ address = "127.0.0.1:9001" }},
  {{ address = "127.0.0.1:9001" }},
]

[pools.api]
backends = [{{ address = "127.0.0.1:9002" }}]
connect_timeout = "3"
"""


def test_many_errors_across_schema_cross_checks_and_files_in_one_run(tmp_path: Path) -> None:
    """Schema errors, references between tables and what run needs, all in one pass, in file
    order: before, cross-checks waited for a clean schema and the access log for both."""
    (tmp_path / "deny.txt").write_text("203.0.113.0/24\n198.51.100.300\n")
    file = tmp_path / "many.toml"
    file.write_text(MANY.format(missing=tmp_path / "nowhere"))
    done = _check(str(file))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    errors = _errors(done.stderr)
    expected = [
        ("workers", 1, "workers = 2"),
        ("log.access", 4, f"directory {tmp_path / 'nowhere'} does not exist"),
        ("listeners[0].deny_file", 10, f"{tmp_path / 'deny.txt'}:2: '198.51.100.300'"),
        ("listeners[1].name", 13, "duplicate name 'a' (also listeners[0])"),
        ("listeners[1].pool", 15, "no pool 'wbe'; defined pools: 'api', 'web'"),
        ("listeners[1].idle_timeout", 16, "it belongs to the pool"),
        ("pools.web.balance", 19, "did you mean 'leastconn'?"),
        ("pools.web.backends[1].address", 22, "duplicate backend '127.0.0.1:9001'"),
        ("pools.api.connect_timeout", 27, "write '3s'"),
    ]
    assert len(errors) == len(expected), errors
    for error, (path, line, fragment) in zip(errors, expected, strict=True):
        assert error.startswith(f"{path}: ") and fragment in error, (error, path)
        assert error.endswith(f"(line {line})"), error
    lines = [int(m.group(1)) for e in errors for m in [re.search(r"\(line (\d+)\)$", e)] if m]
    assert lines == sorted(lines)
    ran = _l4lb("run", "--config", str(file))  # the same file, the same errors
    assert ran.returncode == 1 and _errors(ran.stderr) == errors, ran.stderr
    assert f"{done.stderr.splitlines()[0]}" == f"{file}: {len(expected)} errors"


def test_a_pool_that_failed_is_reported_once(tmp_path: Path) -> None:
    """No cascade: the listener's reference to a pool with errors is not an 'unknown pool'."""
    file = tmp_path / "bad.toml"
    file.write_text(LISTENER + '\n[pools.p]\nbackends = ["127.0.0.1:9"]\nretries = -1\n')
    errors = _errors(_check(str(file)).stderr)
    assert [e.split(":")[0] for e in errors] == ["pools.p.backends[0]", "pools.p.retries"]


def test_warnings_do_not_fail_the_file_and_are_labelled(tmp_path: Path) -> None:
    file = tmp_path / "warn.toml"
    listener = LISTENER + 'accept_proxy = "required"\ntrusted_proxies = ["0.0.0.0/0"]\n'
    file.write_text(listener + POOL)
    done = _check(str(file))
    assert done.returncode == 0, done.stderr
    assert f"{file}: warning: listeners[0].trusted_proxies[0]: '0.0.0.0/0' trusts" in done.stderr
    assert "OK" in done.stdout
    file.write_text(listener.replace('"p"', '"q"') + POOL)  # an error too: both are said
    done = _check(str(file))
    assert done.returncode == 1
    assert "1 error" in done.stderr and "warning: listeners[0].trusted_proxies[0]" in done.stderr


def test_a_bind_on_an_address_this_host_lacks_is_an_error_for_both(tmp_path: Path) -> None:
    file = tmp_path / "bind.toml"
    file.write_text(LISTENER.replace("127.0.0.1:18080", "192.0.2.1:443") + POOL)
    checked = _check(str(file))
    assert checked.returncode == 1, checked.stderr
    (error,) = _errors(checked.stderr)
    assert error.startswith("listeners[0].bind: this host has no address 192.0.2.1:"), error
    assert "ip address add 192.0.2.1/32 dev lo" in error and "ip_nonlocal_bind" in error
    assert error.endswith("(line 3)")
    ran = _l4lb("run", "--config", str(file))
    assert ran.returncode == 1 and _errors(ran.stderr) == [error], ran.stderr


def test_the_file_is_given_once(tmp_path: Path) -> None:
    assert _check().returncode == 2
    assert _check("a.toml", "--config", "b.toml").returncode == 2
    file = tmp_path / "ok.toml"
    file.write_text(LISTENER + POOL)
    assert _check(str(file)).returncode == 0
    assert _check("--config", str(file)).returncode == 0
