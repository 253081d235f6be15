"""``l4lb check`` says what is wrong and shows the right form: the command itself, over files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "l4lb", "check", *args], capture_output=True, text=True, timeout=60
    )


BAD = """\
[[listeners]]
name = "a"
bind = "10.0.0.300:80"
pool = "p"
idle_timeout = "5s"

[[listeners]]
name = "b"
bind = ":443"
pool = "p"

[pools.p]
backends = ["127.0.0.1:1"]
"""


def test_each_wrong_form_gets_the_right_one_in_file_order(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD)
    done = _check(str(path))  # the positional form
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()[1:]
    assert "'10.0.0.300' is not an IP address (IPv4 is four numbers" in lines[0]
    assert "(line 3)" in lines[0]
    assert "hostnames" not in lines[0]
    assert "idle_timeout: unknown key; it belongs to the pool" in lines[1]
    assert "write '0.0.0.0:443' (IPv4) or '[::]:443' (IPv6)" in lines[2]
    assert "write { address = '127.0.0.1:1' }" in lines[3] and "(line 13)" in lines[3]
    assert len(lines) == 4, done.stderr


def test_single_brackets_for_listeners(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[listeners]\nname = "a"\nbind = "127.0.0.1:1"\npool = "p"\n')
    done = _check("--config", str(path))
    assert done.returncode == 1
    assert "write [[listeners]] (double brackets)" in done.stderr, done.stderr


def test_a_bind_on_an_address_this_host_lacks(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(
        '[[listeners]]\nname = "a"\nbind = "192.0.2.1:443"\npool = "p"\n\n'
        '[pools.p]\nbackends = [{ address = "127.0.0.1:1" }]\n'
    )
    done = _check(str(path))
    assert done.returncode == 0, done.stderr
    assert "this host has no address 192.0.2.1" in done.stderr


def test_the_file_is_given_once() -> None:
    assert _check().returncode == 2
    assert _check("a.toml", "--config", "b.toml").returncode == 2
