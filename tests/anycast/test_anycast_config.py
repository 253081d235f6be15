"""``[anycast]``: a valid section loads; every mistake is reported with its key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from l4lb.config import ConfigError, parse_config

# 127.0.0.1 is on every machine's lo: a VIP that is local without touching interfaces
GOOD = """
workers = 1

[[listeners]]
name = "web"
bind = "{bind}"
pool = "web"

[pools.web]
backends = [{{ address = "127.0.0.1:9001" }}]

[anycast]
vips = [{vips}]
local_as = {local_as}
router_id = "{router_id}"
neighbors = [{{ address = "{neighbor}", remote_as = {remote_as} }}]
peers = ["198.51.100.12"]
"""


def _text(**over: object) -> str:
    values: dict[str, object] = {
        "bind": "127.0.0.1:8443",
        "vips": '"127.0.0.1/32"',
        "local_as": 65010,
        "router_id": "203.0.113.2",
        "neighbor": "203.0.113.1",
        "remote_as": 65000,
    }
    values.update(over)
    return GOOD.format(**values)


def _issues(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    return [str(i) for i in err.value.issues]


def test_valid_section_loads_with_defaults() -> None:
    config = parse_config(_text())
    ac = config.anycast
    assert ac is not None
    assert [str(v) for v in ac.vip_nets] == ["127.0.0.1/32"]
    assert ac.hold_time == 3 and ac.second_chance and ac.withdraw_grace_s == 1.0
    assert ac.watchdog_s == 3.0
    assert parse_config(_text(bind="0.0.0.0:8443")).anycast is not None  # a wildcard bind serves it


@pytest.mark.parametrize(
    ("over", "path", "fragment"),
    [
        ({"vips": '"192.0.2.99/32"'}, "anycast.vips[0]", "on no local interface"),
        ({"vips": '"127.0.0.0/24"'}, "anycast.vips[0]", "not one address"),
        ({"vips": '"bogus"'}, "anycast.vips[0]", "invalid VIP"),
        ({"bind": "127.0.0.2:8443"}, "anycast.vips[0]", "no listener binds 127.0.0.1"),
        ({"local_as": 0}, "anycast.local_as", "AS number from 1 to 4294967295"),
        ({"remote_as": 4294967296}, "anycast.neighbors[0].remote_as", "AS number"),
        ({"router_id": "2001:db8::1"}, "anycast.router_id", "expected an IPv4 address"),
        ({"router_id": "router-1"}, "anycast.router_id", "expected an IPv4 address"),
        ({"neighbor": "203.0.113.300"}, "anycast.neighbors[0].address", "expected an IP"),
    ],
)
def test_bad_section_names_key(over: dict[str, object], path: str, fragment: str) -> None:
    issues = _issues(_text(**over))
    assert any(i.startswith(path + ":") and fragment in i for i in issues), issues


def test_more_rules() -> None:
    text = _text().replace("workers = 1", "workers = 2")
    text = text.replace('peers = ["198.51.100.12"]', 'peers = ["node-2"]\nwatchdog = "1ms"')
    issues = _issues(text)
    assert any(i.startswith("workers:") and "workers = 1" in i for i in issues), issues
    assert any(i.startswith("anycast.peers[0]:") for i in issues), issues
    assert any(i.startswith("anycast.watchdog:") for i in issues), issues
    text = _text().replace("[anycast]", "[anycast]\nhold_time = 1\nneighbours = []")
    issues = _issues(text)
    assert any(i.startswith("anycast.hold_time:") for i in issues), issues
    assert any("anycast.neighbours" in i and "did you mean 'neighbors'" in i for i in issues)


def test_check_command_reports_anycast_errors(tmp_path: Path) -> None:
    path = tmp_path / "lb.toml"
    path.write_text(_text(vips='"192.0.2.99/32"', local_as=0))
    result = subprocess.run(
        [sys.executable, "-m", "l4lb", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "anycast.local_as" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_run_without_the_extra_says_how_to_install_it(tmp_path: Path) -> None:
    """A Python where ExaBGP is not installed (no site-packages, only l4lb's own dependencies
    linked in): ``l4lb run`` with ``[anycast]`` names the extra instead of a traceback."""
    import msgspec
    import prometheus_client

    site = tmp_path / "site"
    site.mkdir()
    for module in (msgspec, prometheus_client):
        assert module.__file__ is not None
        (site / module.__name__).symlink_to(Path(module.__file__).parent)
    src = Path(__file__).parents[2] / "src"
    path = tmp_path / "lb.toml"
    path.write_text(_text() + '\n[log]\naccess = "off"\n')
    code = "import sys; from l4lb.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-S", "-c", code, "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": f"{src}:{site}", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1, result.stderr
    assert "pip install 'l4lb[anycast]'" in result.stderr
    assert "Traceback" not in result.stderr
