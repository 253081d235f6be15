"""Backend addresses that name DNS records (``NAME:PORT``, ``srv+_SERVICE._PROTO.NAME``), the
``[resolver]`` table and ``[admin] keep_api_backends``: ``l4lb check`` validates the form of a
name without resolving it, and says what to install when dnspython is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from l4lb.config import ConfigError, parse_config
from l4lb.config.values import AddressKind, parse_backend_address


def text(backend: str, tail: str = "") -> str:
    return f"""workers = 1

[[listeners]]
name = "web"
bind = "127.0.0.1:8443"
pool = "web"

[pools.web]
backends = [{{ address = "{backend}" }}]
{tail}
"""


@pytest.mark.parametrize(
    ("address", "kind", "host", "port"),
    [
        ("10.0.0.5:8443", AddressKind.IP, "10.0.0.5", 8443),
        ("[2001:db8::5]:8443", AddressKind.IP, "2001:db8::5", 8443),
        ("app.internal:8443", AddressKind.NAME, "app.internal", 8443),
        ("App.Internal.:80", AddressKind.NAME, "app.internal", 80),
        ("web-1.svc.cluster.local:443", AddressKind.NAME, "web-1.svc.cluster.local", 443),
        ("srv+_https._tcp.app.internal", AddressKind.SRV, "_https._tcp.app.internal", 0),
    ],
)
def test_the_address_forms(address: str, kind: AddressKind, host: str, port: int) -> None:
    parsed = parse_backend_address(address)
    assert (parsed.kind, parsed.host, parsed.port) == (kind, host, port)
    config = parse_config(text(address))
    assert config.pools["web"].backends[0].dynamic is (kind is not AddressKind.IP)


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("app.internal", "missing port; expected IP:PORT, NAME:PORT"),
        ("app..internal:80", "neither an IP address nor a DNS name"),
        ("-app.internal:80", "neither an IP address nor a DNS name"),
        ("app_1.internal:80", "neither an IP address nor a DNS name"),
        ("app.internal:0", "port must be 1..65535"),
        ("app.internal:99999", "port must be 1..65535"),
        ("1.2.3:80", "'1.2.3' is not an IP address"),
        ("srv+app.internal", "expected 'srv+_SERVICE._PROTO.NAME'"),
        ("srv+_https._tcp.app.internal:443", "no ':PORT'"),
    ],
)
def test_a_bad_name_is_refused_with_the_forms_that_work(address: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text(address))
    [issue] = info.value.issues
    assert issue.path == "pools.web.backends[0].address"
    assert message in issue.message, issue.message
    assert "hostnames are not resolved" not in issue.message


def test_the_resolver_table() -> None:
    config = parse_config(
        text(
            "app.internal:80",
            '[resolver]\nnameservers = ["127.0.0.1:5353", "::1", "10.0.0.2"]\n'
            'resolve_min = "500ms"\nresolve_max = "1m"\ntimeout = "1s"\n',
        )
    )
    resolver = config.resolver
    assert resolver.nameserver_addrs == (("127.0.0.1", 5353), ("::1", 53), ("10.0.0.2", 53))
    assert (resolver.resolve_min_s, resolver.resolve_max_s, resolver.timeout_s) == (0.5, 60, 1)
    assert parse_config(text("10.0.0.1:80")).resolver.nameservers == ()  # /etc/resolv.conf


@pytest.mark.parametrize(
    ("table", "path", "message"),
    [
        ('resolve_min = "10ms"', "resolver.resolve_min", "at least '100ms'"),
        ('resolve_min = "2m"\nresolve_max = "1m"', "resolver", "must not be longer"),
        ('nameservers = ["dns.example:53"]', "resolver.nameservers[0]", "not an IP address"),
        ('servers = ["127.0.0.1"]', "resolver.servers", "did you mean 'nameservers'"),
    ],
)
def test_a_bad_resolver_table_is_refused(table: str, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text("app.internal:80", f"[resolver]\n{table}\n"))
    [issue] = info.value.issues
    assert issue.path == path and message in issue.message, issue


def test_keep_api_backends_is_an_admin_key() -> None:
    config = parse_config(text("10.0.0.1:80", "[admin]\nkeep_api_backends = true\n"))
    assert config.admin is not None and config.admin.keep_api_backends


def test_check_accepts_a_name_without_resolving_it(tmp_path: Path) -> None:
    path = tmp_path / "l4lb.toml"
    # .invalid never resolves (RFC 6761): check must not try
    path.write_text(text("app.invalid:8443", '[resolver]\nnameservers = ["127.0.0.1:9"]\n'))
    result = subprocess.run(
        [sys.executable, "-m", "l4lb", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_without_dnspython_a_name_is_an_error_saying_what_to_install(tmp_path: Path) -> None:
    """dnspython made unimportable in the child (``sys.modules['dns'] = None``), as on a
    machine where the ``dns`` extra is not installed."""
    path = tmp_path / "l4lb.toml"
    path.write_text(text("app.internal:8443"))
    code = (
        "import sys; sys.modules['dns'] = None; from l4lb.cli import main; "
        f"sys.exit(main(['check', '--config', {str(path)!r}]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "pools.web.backends[0].address" in result.stderr
    assert "pip install 'l4lb[dns]'" in result.stderr
    assert "Traceback" not in result.stderr
    # an IP backend needs no dnspython
    path.write_text(text("10.0.0.5:8443"))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
