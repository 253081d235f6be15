"""Health checks that fit TLS backends, against a real nginx with self-signed certificates
(made by the test with openssl): ``check = "tls"``, ``http`` with ``https``, ``http_host``,
``http_method``, ``expect_status``, and the hint when a plain ``http`` check meets a TLS port."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from l4lb.balancer.health import CheckResult, CheckSettings, Target, run_probe, tls_context
from tests.balancer.test_routes_nginx import make_cert
from tests.support.l4lb import config_text, l4lb
from tests.support.peers import free_port, have, nginx, wait_for

pytestmark = pytest.mark.skipif(
    not (have("nginx") and have("openssl")), reason="needs nginx and openssl"
)


@dataclass
class Ports:
    tls: int
    """TLS, server_name api.example.com (200 on /healthz, HEAD only on /head) + a default."""
    tls_proxy: int
    """The same behind ``proxy_protocol`` (the check sends a v2 LOCAL header first)."""
    plain: int
    """Plain HTTP: a "broken" TLS backend."""
    ca: Path


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ports]:
    work = tmp_path_factory.mktemp("health_tls")
    cert, key = make_cert(work / "certs", "api.example.com")
    other = make_cert(work / "certs", "default.test")
    ports = Ports(free_port(), free_port(), free_port(), cert)
    locations = (
        '  location = /healthz { return 200 "ok\\n"; }\n'
        "  location = /head { if ($request_method != HEAD) { return 405; } return 200; }\n"
        "  location / { return 404; }\n"
    )
    http = ""
    for port, extra in ((ports.tls, ""), (ports.tls_proxy, " proxy_protocol")):
        http += (
            f"server {{ listen 127.0.0.1:{port} ssl{extra} default_server;"
            f" server_name default.test;\n"
            f"  ssl_certificate {other[0]}; ssl_certificate_key {other[1]};\n"
            '  location / { return 421 "wrong name\\n"; } }\n'
            f"server {{ listen 127.0.0.1:{port} ssl{extra}; server_name api.example.com;\n"
            f"  ssl_certificate {cert}; ssl_certificate_key {key};\n{locations}}}\n"
        )
    http += f"server {{ listen 127.0.0.1:{ports.plain}; {locations}}}\n"
    wait = [("127.0.0.1", p) for p in (ports.tls, ports.tls_proxy, ports.plain)]
    with nginx(work / "nginx", http=http, wait=wait):
        yield ports


def _probe(port: int, settings: CheckSettings, proxy_version: int = 0) -> CheckResult:
    target = Target("p", f"127.0.0.1:{port}", "127.0.0.1", port, proxy_version)
    return asyncio.run(run_probe(target, settings))


def _tls(**kw: object) -> CheckSettings:
    verify = bool(kw.pop("verify", False))
    ca = kw.pop("ca", None)
    return CheckSettings(tls=tls_context(verify, str(ca) if ca else None), timeout=5.0, **kw)  # type: ignore[arg-type]


def test_tls_check_passes_on_a_tls_port(backends: Ports) -> None:
    result = _probe(backends.tls, _tls(check="tls", sni="api.example.com"))
    assert result.ok and result.detail.startswith("TLS handshake ok (TLSv1."), result.detail


def test_tls_check_sends_the_proxy_header_first(backends: Ports) -> None:
    assert _probe(backends.tls_proxy, _tls(check="tls"), proxy_version=2).ok
    without = _probe(backends.tls_proxy, _tls(check="tls"), proxy_version=0)
    assert not without.ok and "TLS handshake failed" in without.detail


def test_tls_check_fails_on_a_plain_port(backends: Ports) -> None:
    result = _probe(backends.plain, _tls(check="tls"))
    assert not result.ok and result.detail.startswith("TLS handshake failed"), result.detail


def test_tls_check_verifies_the_certificate_when_asked(backends: Ports) -> None:
    ok = _probe(backends.tls, _tls(check="tls", sni="api.example.com", verify=True, ca=backends.ca))
    assert ok.ok, ok.detail
    # No SNI: nginx answers with the default server's certificate, which the CA did not sign.
    wrong = _probe(backends.tls, _tls(check="tls", sni="default.test", verify=True, ca=backends.ca))
    assert not wrong.ok and "certificate not accepted" in wrong.detail, wrong.detail
    system = _probe(backends.tls, _tls(check="tls", sni="api.example.com", verify=True))
    assert (not system.ok and "self-signed" in system.detail) or "self signed" in system.detail


@pytest.mark.parametrize(
    ("path", "method", "expect", "ok", "detail"),
    [
        ("/healthz", "GET", ((200, 399),), True, "HTTP 200 over TLS"),
        ("/missing", "GET", ((200, 399),), False, "GET /missing: HTTP 404 over TLS"),
        ("/missing", "GET", ((200, 200), (404, 404)), True, "HTTP 404 over TLS"),
        ("/head", "HEAD", ((200, 200),), True, "HTTP 200 over TLS"),
        ("/head", "GET", ((200, 200),), False, "HTTP 405"),
    ],
)
def test_https_check_with_host_method_and_statuses(
    backends: Ports,
    path: str,
    method: str,
    expect: tuple[tuple[int, int], ...],
    ok: bool,
    detail: str,
) -> None:
    settings = _tls(
        check="http",
        https=True,
        http_path=path,
        http_method=method,
        http_host="api.example.com",
        sni="api.example.com",
        expect_status=expect,
    )
    result = _probe(backends.tls, settings)
    assert result.ok is ok and detail in result.detail, result.detail


def test_https_check_without_the_right_name_reaches_the_default_server(backends: Ports) -> None:
    settings = _tls(check="http", https=True, http_path="/healthz")  # no SNI, no Host name
    result = _probe(backends.tls, settings)
    assert not result.ok and "HTTP 421 over TLS" in result.detail


def test_plain_http_check_on_a_tls_port_says_it_looks_like_tls(backends: Ports) -> None:
    result = _probe(backends.tls, CheckSettings("http", http_path="/healthz", timeout=5.0))
    assert not result.ok
    assert "HTTP 400" in result.detail and "the port speaks TLS; set https = true" in result.detail


def test_plain_http_check_that_gets_a_tls_alert_says_so() -> None:
    """A TLS server that answers plain text with an alert record (as some TLS stacks do)."""

    async def main() -> CheckResult:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(100)
            writer.write(b"\x15\x03\x03\x00\x02\x02\x46")  # fatal alert: protocol_version
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        target = Target("p", f"127.0.0.1:{port}", "127.0.0.1", port)
        async with server:
            return await run_probe(target, CheckSettings("http", timeout=5.0))

    result = asyncio.run(main())
    assert not result.ok and "answered with a TLS record (alert)" in result.detail


def test_plain_http_check_on_a_plain_port_gives_no_tls_hint(backends: Ports) -> None:
    result = _probe(backends.plain, CheckSettings("http", http_path="/missing", timeout=5.0))
    assert not result.ok and result.detail == "GET /missing: HTTP 404"


def _status(admin: int) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=10) as resp:
        pool = json.load(resp)["pools"][0]
    return {b["address"]: b["state"] for b in pool["backends"]}


def test_a_broken_tls_backend_is_marked_down(backends: Ports, tmp_path: Path) -> None:
    admin = free_port()
    good, broken = f"127.0.0.1:{backends.tls}", f"127.0.0.1:{backends.plain}"
    text = config_text(
        f"127.0.0.1:{free_port()}",
        [good, broken],
        pool={"send_proxy": "off"},
        health={"check": "tls", "sni": "api.example.com", "interval": "200ms", "fall": 1},
    )
    text += f'\n[admin]\nbind = "127.0.0.1:{admin}"\n'
    with l4lb(tmp_path, text):
        assert wait_for(lambda: _status(admin) == {good: "up", broken: "down"})
    log = (tmp_path / "l4lb.log").read_text()
    assert f"event=health_down pool=main backend={broken} check=tls" in log
    assert "TLS handshake failed" in log


HEALTH_CONFIG = """
[[listeners]]
name = "main"
bind = "127.0.0.1:8443"
pool = "main"
[pools.main]
backends = [{{ address = "127.0.0.1:9001" }}]
[pools.main.health]
{health}
"""


def test_tls_check_keys_in_the_config(backends: Ports, tmp_path: Path) -> None:
    from l4lb.config.loader import parse_config

    (tmp_path / "ca.pem").write_bytes(backends.ca.read_bytes())
    health = (
        'check = "http"\nhttps = true\nhttp_host = "api.example.com"\nhttp_method = "HEAD"\n'
        'expect_status = "200,300-399"\ntls_verify = true\ntls_ca_file = "ca.pem"\n'
    )
    text = HEALTH_CONFIG.format(health=health)
    cfg = parse_config(text, base_dir=tmp_path).pools["main"].health
    assert cfg is not None and cfg.tls_ca_file == str(tmp_path / "ca.pem")  # relative to the file
    assert cfg is not None
    settings = CheckSettings.from_config(cfg)
    assert settings.expect_status == ((200, 200), (300, 399))
    assert settings.sni == "api.example.com" and settings.http_method == "HEAD"
    assert settings.tls is not None and settings.tls.check_hostname


@pytest.mark.parametrize(
    ("health", "message"),
    [
        ('check = "http"\nexpect_status = "2xx"', "invalid status list '2xx'"),
        ('check = "http"\nexpect_status = "399-200"', "100 <= low <= high <= 599"),
        ('check = "http"\nexpect_status = "600"', "100 <= low <= high <= 599"),
        ('check = "tcp"\nhttps = true', "https = true applies to check = 'http'"),
        ('check = "tls"\ntls_ca_file = "/x.pem"', "tls_ca_file needs tls_verify = true"),
        ('check = "http"\nhttp_method = "DELETE"', "http_method"),
        ('check = "tls"\nsni = "not a name"', "sni"),
        (
            'check = "tls"\ntls_verify = true\ntls_ca_file = "/nonexistent/ca.pem"',
            "health.tls_ca_file: cannot load CA certificates from /nonexistent/ca.pem",
        ),
    ],
)
def test_bad_tls_check_keys_are_config_errors(health: str, message: str) -> None:
    from l4lb.config.loader import ConfigError, parse_config

    with pytest.raises(ConfigError) as err:
        parse_config(HEALTH_CONFIG.format(health=health))
    assert message in str(err.value)
