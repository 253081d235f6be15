"""`l4lb check` refuses what `l4lb run` cannot run: bounds on numbers and durations, zone ids,
header injection in http_path, deny_file that is not a regular file, an empty admin token, and a
self-loop through a v4-mapped address; and it warns (as `run` does) about trusting everyone.

Each error names its key path and line, and `check` and `run` give the same answer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from l4lb.config import ConfigError, ConfigIssue, load_config, parse_config

BASE = """workers = 1

[[listeners]]
name = "web"
bind = "127.0.0.1:8443"
pool = "web"
{listener}
[pools.web]
backends = [{{ address = "{backend}" }}]
{pool}
{tail}
"""


def config(
    listener: str = "", pool: str = "", tail: str = "", backend: str = "127.0.0.1:9001"
) -> str:
    return BASE.format(listener=listener, pool=pool, tail=tail, backend=backend)


def errors(text: str) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return info.value.issues


def one_error(text: str, path: str) -> ConfigIssue:
    issues = errors(text)
    found = [i for i in issues if i.path == path]
    assert found, f"no error at {path}: {issues}"
    assert found[0].line is not None, found[0]
    return found[0]


def _run(tmp_path: Path, command: str, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "l4lb.toml"
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "l4lb", command, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- bounds on numbers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("workers", "bound"),
    [("0", ">= 1"), ("257", "<= 256"), ("99999999999999999999", "<= 256")],
)
def test_workers_out_of_range(workers: str, bound: str) -> None:
    """99999999999999999999 passed check, then run died with a MemoryError (issue 11, bug 7)."""
    issue = one_error(config().replace("workers = 1", f"workers = {workers}"), "workers")
    assert bound in issue.message


def test_workers_at_the_bound_is_accepted() -> None:
    assert parse_config(config().replace("workers = 1", "workers = 256")).workers == 256


# --- durations: a floor per key, HAProxy's ceiling for all -------------------------------------

TOO_SHORT = [
    ('[pools.web.health]\ninterval = "0.0001ms"', "pools.web.health.interval", "100ms"),
    ('[pools.web.health]\ninterval = "99ms"', "pools.web.health.interval", "100ms"),
    ('[pools.web.health]\ntimeout = "1ms"', "pools.web.health.timeout", "10ms"),
]


@pytest.mark.parametrize(("tail", "path", "floor"), TOO_SHORT)
def test_durations_below_their_floor(tail: str, path: str, floor: str) -> None:
    issue = one_error(config(tail=tail), path)
    assert f"at least '{floor}'" in issue.message


@pytest.mark.parametrize(
    ("pool", "listener", "path"),
    [
        ('connect_timeout = "0.5ms"', "", "pools.web.connect_timeout"),
        ('idle_timeout = "0.001ms"', "", "pools.web.idle_timeout"),
        ("", 'proxy_header_timeout = "0.01ms"', "listeners[0].proxy_header_timeout"),
    ],
)
def test_timeouts_below_10ms(pool: str, listener: str, path: str) -> None:
    issue = one_error(config(pool=pool, listener=listener), path)
    assert "at least '10ms'" in issue.message


@pytest.mark.parametrize("value", ["597h", "99999999999h", "9" * 400 + "s", "2147484s", "35792m"])
def test_durations_above_haproxy_ceiling(value: str) -> None:
    issue = one_error(config(pool=f'idle_timeout = "{value}"'), "pools.web.idle_timeout")
    assert "at most '596h'" in issue.message


def test_drain_timeout_huge_and_zero() -> None:
    text = config().replace("workers = 1", 'workers = 1\ndrain_timeout = "1000000h"')
    assert "at most" in one_error(text, "drain_timeout").message
    ok = config().replace("workers = 1", 'workers = 1\ndrain_timeout = "0s"')
    assert parse_config(ok).drain_timeout_s == 0


def test_floors_and_ceiling_accepted() -> None:
    text = config(
        pool='connect_timeout = "10ms"\nidle_timeout = "596h"',
        tail='[pools.web.health]\ninterval = "100ms"\ntimeout = "10ms"',
    )
    parse_config(text)


# --- IPv6 zone ids ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listener", "path"),
    [
        ('deny = ["fe80::%lo/64"]', "listeners[0].deny[0]"),
        ('allow = ["::1/128", "fe80::1%eth0"]', "listeners[0].allow[1]"),
        (
            'accept_proxy = "required"\ntrusted_proxies = ["fe80::%lo/64"]',
            "listeners[0].trusted_proxies[0]",
        ),
    ],
)
def test_zone_id_in_a_cidr_is_a_config_error(listener: str, path: str) -> None:
    issue = one_error(config(listener=listener), path)
    assert "zone" in issue.message
    assert "fe80::/64" in issue.message or "fe80::1" in issue.message


def test_zone_id_in_a_backend_address_is_a_config_error() -> None:
    issue = one_error(config(backend="[fe80::1%lo]:80"), "pools.web.backends[0].address")
    assert "zone" in issue.message


def test_zone_id_in_deny_file_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "deny.txt").write_text("203.0.113.0/24\nfe80::%lo/64\n")
    path = tmp_path / "l4lb.toml"
    path.write_text(config(listener='deny_file = "deny.txt"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (issue,) = info.value.issues
    assert issue.path == "listeners[0].deny_file"
    assert "deny.txt:2" in issue.message and "zone" in issue.message


def test_check_and_run_agree_on_a_zone_id(tmp_path: Path) -> None:
    """The regression of issue 11 bug 6: check said OK, run died with a CidrError traceback."""
    text = config(listener='deny = ["fe80::%lo/64"]')
    for command in ("check", "run"):
        result = _run(tmp_path, command, text)
        out = result.stdout + result.stderr
        assert result.returncode == 1, (command, out)
        assert "Traceback" not in out, out
        assert "listeners[0].deny[0]" in out and "zone" in out, out
        assert "(line 7)" in out, out


# --- header injection, deny_file kinds, admin token ----------------------------------------------


@pytest.mark.parametrize(
    "path_value",
    ["/health\\r\\nX-Injected: 1", "/a\\nb", "/with space", "/tab\\there", "/nul\\u0000"],
)
def test_http_path_with_control_characters_or_spaces(path_value: str) -> None:
    tail = f'[pools.web.health]\ncheck = "http"\nhttp_path = "{path_value}"'
    issue = one_error(config(tail=tail), "pools.web.health.http_path")
    assert "control characters" in issue.message


def test_http_path_with_query_is_fine() -> None:
    tail = '[pools.web.health]\ncheck = "http"\nhttp_path = "/healthz?full=1&x=%20"'
    parse_config(config(tail=tail))


def _deny_file_issue(tmp_path: Path, target: str) -> str:
    path = tmp_path / "l4lb.toml"
    path.write_text(config(listener=f'deny_file = "{target}"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (issue,) = info.value.issues
    assert issue.path == "listeners[0].deny_file"
    return issue.message


def test_deny_file_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    message = _deny_file_issue(tmp_path, "lists")
    assert "is a directory" in message and "no such file" not in message


def test_deny_file_that_is_a_device(tmp_path: Path) -> None:
    message = _deny_file_issue(tmp_path, "/dev/null")
    assert "not a regular file" in message and "character device" in message


def test_deny_file_that_is_a_fifo_is_refused_without_reading_it(tmp_path: Path) -> None:
    """Reading a FIFO would block `check` (and a reload) until a writer came."""
    os.mkfifo(tmp_path / "deny.fifo")
    message = _deny_file_issue(tmp_path, "deny.fifo")
    assert "not a regular file" in message and "FIFO" in message


def test_deny_file_missing_and_empty(tmp_path: Path) -> None:
    assert "no such file" in _deny_file_issue(tmp_path, "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    path = tmp_path / "l4lb.toml"
    path.write_text(config(listener='deny_file = "empty.txt"'))
    load_config(path)  # an empty list is a valid list


@pytest.mark.parametrize("token", ['""', '"   "', '"tab\\tinside"', '"caf\\u00e9"'])
def test_admin_token_must_be_visible_ascii(token: str) -> None:
    tail = f'[admin]\nbind = "127.0.0.1:9100"\ntoken = {token}'
    issue = one_error(config(tail=tail), "admin.token")
    assert "token" in issue.message


def test_admin_without_token_is_still_allowed() -> None:
    parse_config(config(tail='[admin]\nbind = "127.0.0.1:9100"'))


# --- self-loop through a v4-mapped address ------------------------------------------------------


@pytest.mark.parametrize(
    ("bind", "backend"),
    [
        ("[::]:8443", "[::ffff:127.0.0.1]:8443"),
        ("0.0.0.0:8443", "[::ffff:127.0.0.1]:8443"),
        ("127.0.0.1:8443", "[::ffff:127.0.0.1]:8443"),
        ("[::]:8443", "[::ffff:0.0.0.0]:8443"),
        ("[::ffff:127.0.0.1]:8443", "127.0.0.1:8443"),
        ("[::ffff:0.0.0.0]:8443", "127.0.0.9:8443"),
    ],
)
def test_self_loop_through_a_v4_mapped_backend(bind: str, backend: str) -> None:
    text = config(backend=backend).replace('bind = "127.0.0.1:8443"', f'bind = "{bind}"')
    issue = one_error(text, "pools.web.backends[0].address")
    assert "own listener 'web'" in issue.message


def test_v4_mapped_backend_elsewhere_is_fine() -> None:
    text = config(backend="[::ffff:192.0.2.7]:8443").replace(
        'bind = "127.0.0.1:8443"', 'bind = "[::]:8443"'
    )
    parse_config(text)


# --- warnings: trusting every address ------------------------------------------------------------


@pytest.mark.parametrize("cidr", ["0.0.0.0/0", "::/0", "::ffff:0:0/96"])
def test_trusting_everyone_is_a_warning(tmp_path: Path, cidr: str) -> None:
    text = config(listener=f'accept_proxy = "optional"\ntrusted_proxies = ["{cidr}"]')
    path = tmp_path / "l4lb.toml"
    path.write_text(text)
    warnings: list[ConfigIssue] = []
    load_config(path, warnings=warnings)
    (warning,) = warnings
    assert warning.path == "listeners[0].trusted_proxies[0]"
    assert warning.line == 8
    assert "anyone" in warning.message and "forge" in warning.message
    result = _run(tmp_path, "check", text)
    assert result.returncode == 0, result.stderr
    assert "warning: listeners[0].trusted_proxies[0]" in result.stderr, result.stderr


def test_narrow_trust_has_no_warning(tmp_path: Path) -> None:
    path = tmp_path / "l4lb.toml"
    path.write_text(config(listener='accept_proxy = "required"\ntrusted_proxies = ["10.0.0.0/8"]'))
    warnings: list[ConfigIssue] = []
    load_config(path, warnings=warnings)
    assert warnings == []


def test_run_logs_the_trust_warning_at_start(tmp_path: Path) -> None:
    from tests.support.l4lb import config_text, l4lb
    from tests.support.peers import free_port

    text = config_text(
        f"127.0.0.1:{free_port()}",
        ["127.0.0.1:9"],
        listener={"accept_proxy": "optional", "trusted_proxies": ["0.0.0.0/0"]},
    )
    with l4lb(tmp_path, text) as lb:
        log = lb.log_text()
    assert "event=config_warning" in log and "trusts every address" in log, log


# --- further: counts and rates without an upper bound ---------------------------------------------

HUGE = "100000000000000000000"


@pytest.mark.parametrize(
    ("listener", "backend_extra", "path"),
    [
        (f"max_conns = {HUGE}", "", "listeners[0].max_conns"),
        (f"max_pending_headers = {HUGE}", "", "listeners[0].max_pending_headers"),
        (f"max_conns_per_client = {HUGE}", "", "listeners[0].max_conns_per_client"),
        (
            f'new_conns_per_client = "1/s"\nnew_conns_burst = {HUGE}',
            "",
            "listeners[0].new_conns_burst",
        ),
        ("", f", max_conns = {HUGE}", "pools.web.backends[0].max_conns"),
    ],
)
def test_counts_have_an_upper_bound(listener: str, backend_extra: str, path: str) -> None:
    text = config(listener=listener).replace(
        '"127.0.0.1:9001" }', f'"127.0.0.1:9001"{backend_extra} }}'
    )
    assert "<= 1000000" in one_error(text, path).message


@pytest.mark.parametrize("rate", ["1000001/s", "9" * 400 + "/s", "60000001/m"])
def test_rate_has_an_upper_bound(rate: str) -> None:
    """A rate of 400 nines per second was infinity to a float: run died with OverflowError."""
    issue = one_error(
        config(listener=f'new_conns_per_client = "{rate}"'), "listeners[0].new_conns_per_client"
    )
    assert "at most '1000000/s'" in issue.message


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1.5", "-1"])
def test_toml_floats_and_negatives_in_integer_keys(value: str) -> None:
    for key in ("workers",):
        one_error(config().replace("workers = 1", f"{key} = {value}"), key)
    text = config().replace('"127.0.0.1:9001" }', f'"127.0.0.1:9001", weight = {value} }}')
    one_error(text, "pools.web.backends[0].weight")


def test_run_refuses_an_infinite_rate_without_a_traceback(tmp_path: Path) -> None:
    text = config(listener=f'new_conns_per_client = "{"9" * 400}/s"')
    result = _run(tmp_path, "run", text)
    out = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in out, out
    assert "listeners[0].new_conns_per_client" in out


def test_admin_hosts_are_dns_names() -> None:
    ok = config(tail='[admin]\nbind = "127.0.0.1:9100"\nhosts = ["lb1.example.net", "lb1"]')
    assert parse_config(ok).admin is not None
    for bad in ("http://lb1", "lb1:9100", "", "a b"):
        text = config(tail=f'[admin]\nbind = "127.0.0.1:9100"\nhosts = ["{bad}"]')
        assert "DNS name" in one_error(text, "admin.hosts[0]").message


def test_send_expect_with_an_empty_expect_is_refused() -> None:
    """An empty expect matched any answer, even none: the check could never fail on content."""
    tail = '[pools.web.health]\ncheck = "send-expect"\nsend = "PING\\r\\n"\nexpect = ""'
    issue = one_error(config(tail=tail), "pools.web.health")
    assert "expect" in issue.message and "empty" in issue.message
    ok = '[pools.web.health]\ncheck = "send-expect"\nsend = ""\nexpect = "220 "'
    parse_config(config(tail=ok))  # an empty send waits for a banner: that is fine


# --- further: an access log path that run cannot open --------------------------------------------


@pytest.mark.parametrize(
    ("access", "why"),
    [(".", "Is a directory"), ("missing/access.log", "No such file or directory")],
)
def test_check_refuses_an_access_log_run_cannot_open(tmp_path: Path, access: str, why: str) -> None:
    """check said OK, then run failed at start (event=start_failed)."""
    text = config().replace("workers = 1", f'workers = 1\n[log]\naccess = "{access}"', 1)
    result = _run(tmp_path, "check", text)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "log.access" in result.stderr and why in result.stderr, result.stderr
    assert "(line 3)" in result.stderr


def test_check_warns_about_a_fifo_access_log(tmp_path: Path) -> None:
    """Opening a FIFO for writing waits for a reader: run stays silent until one comes."""
    os.mkfifo(tmp_path / "log.fifo")
    text = config().replace("workers = 1", 'workers = 1\n[log]\naccess = "log.fifo"', 1)
    result = _run(tmp_path, "check", text)
    assert result.returncode == 0, result.stderr
    assert "warning: log.access" in result.stderr and "FIFO" in result.stderr


# --- further: the config file itself ------------------------------------------------------------


def test_a_config_file_that_never_ends_is_refused() -> None:
    """`l4lb check -c /dev/zero` read until memory ran out."""
    with pytest.raises(ConfigError) as info:
        load_config("/dev/zero")
    assert "larger than" in str(info.value)


def test_a_config_from_a_pipe_still_works(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "l4lb", "check", "--config", "/dev/stdin"],
        input=config(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
