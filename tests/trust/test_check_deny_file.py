"""`l4lb check` reads deny_file line by line: a bad line is reported as file:line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CONFIG = """
[[listeners]]
name = "edge"
bind = "127.0.0.1:18443"
pool = "web"
accept_proxy = "required"
trusted_proxies = ["127.0.0.1/32"]
deny_file = "deny.txt"

[pools.web]
backends = [{ address = "127.0.0.1:9001" }]
"""


def check(tmp_path: Path, deny: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "deny.txt").write_text(deny)
    (tmp_path / "l4lb.toml").write_text(CONFIG)
    return subprocess.run(
        [sys.executable, "-m", "l4lb", "check", "--config", str(tmp_path / "l4lb.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_good_deny_file(tmp_path: Path) -> None:
    result = check(tmp_path, "# list\n203.0.113.0/24\n2001:db8::/32  # v6\n198.51.100.42\n")
    assert result.returncode == 0, result.stdout + result.stderr


def test_bad_line_in_deny_file_names_file_and_line(tmp_path: Path) -> None:
    result = check(tmp_path, "203.0.113.0/24\n\n# next one is wrong\n198.51.100.300\n")
    assert result.returncode == 1
    out = result.stdout + result.stderr
    assert f"listeners[0].deny_file: {tmp_path / 'deny.txt'}:4: '198.51.100.300'" in out
    assert "Traceback" not in out
