"""An operator's mistakes caught by ``l4lb check`` (the real command) before they reach a run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BASE = """
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


def _check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "l4lb.toml"
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "l4lb", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _config(listener: str = "", pool: str = "", tail: str = "") -> str:
    return BASE.format(listener=listener, pool=pool, tail=tail)


# (config, key path, what the message must say): zero timeouts would fail every connect, close
# every connection at the first sweep, or run health checks in a busy loop.
ZERO_OR_EMPTY = [
    (_config(pool='connect_timeout = "0s"'), "pools.web.connect_timeout", "greater than zero"),
    (_config(pool='idle_timeout = "0ms"'), "pools.web.idle_timeout", "greater than zero"),
    (
        _config(listener='proxy_header_timeout = "0h"'),
        "listeners[0].proxy_header_timeout",
        "greater than zero",
    ),
    (
        _config(tail='[pools.web.health]\ninterval = "0s"'),
        "pools.web.health.interval",
        "greater than zero",
    ),
    (
        _config(tail='[pools.web.health]\ntimeout = "0.0s"'),
        "pools.web.health.timeout",
        "greater than zero",
    ),
    (_config(tail='[log]\naccess = ""'), "log.access", "'stdout', 'off' or a file path"),
]


@pytest.mark.parametrize(("text", "key", "hint"), ZERO_OR_EMPTY)
def test_check_refuses_zero_timeouts_and_empty_access_log(
    tmp_path: Path, text: str, key: str, hint: str
) -> None:
    result = _check(tmp_path, text)
    assert result.returncode == 1, result
    assert "Traceback" not in result.stdout + result.stderr
    out = result.stdout + result.stderr
    line = next(ln for ln in out.splitlines() if ln.strip().startswith(key + ":"))
    assert hint in line


@pytest.mark.parametrize(
    "text",
    [
        'drain_timeout = "0s"\n' + _config(),
        _config(pool='tls_peek_timeout = "0s"'),
    ],
)
def test_zero_is_still_fine_where_it_means_do_not_wait(tmp_path: Path, text: str) -> None:
    result = _check(tmp_path, text)
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
    result = _check(tmp_path, _pointing(bind, backend))
    out = result.stdout + result.stderr
    assert "Traceback" not in out
    if not loops:
        assert result.returncode == 0, out
        return
    assert result.returncode == 1, out
    line = next(ln for ln in out.splitlines() if "pools.web.backends[1].address:" in ln)
    assert "own listener 'front'" in line and "loop" in line
