"""Routes end to end: real nginx TLS backends chosen by SNI and ALPN through one l4lb listener,
reached with curl (``--resolve NAME:PORT:127.0.0.1``), never decrypted by the balancer.

Each pool is its own nginx ``server`` port (TLS, PROXY v2 from the balancer); the answer says
which server block took the request and over which protocol, so a name landing in the wrong pool
shows. Certificates are self-signed, made by the test with ``openssl``.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.l4lb import L4lb, l4lb
from tests.support.peers import free_port, have, nginx

pytestmark = pytest.mark.skipif(
    not (have("nginx") and have("openssl") and have("curl")), reason="needs nginx, openssl, curl"
)

NAMES = ("api.example.com", "www.example.com", "shop.example.com", "default.test")


def make_cert(workdir: Path, name: str, alt: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A self-signed certificate and key for ``name`` (and ``alt`` names), made with openssl."""
    workdir.mkdir(parents=True, exist_ok=True)
    cert, key = workdir / f"{name}.crt", workdir / f"{name}.key"
    san = ",".join(f"DNS:{n}" for n in (name, *alt))
    args = ["-subj", f"/CN={name}", "-addext", f"subjectAltName={san}"]
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            *args,
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def tls_server(port: int, name: str, cert: tuple[Path, Path], extra: str = "") -> str:
    """An nginx ``server`` block: TLS (h2 and http/1.1) with the PROXY protocol on ``port``;
    answers ``<name> <protocol> <client>``."""
    return (
        f"server {{ listen 127.0.0.1:{port} ssl http2 proxy_protocol; server_name {name};\n"
        f"  ssl_certificate {cert[0]}; ssl_certificate_key {cert[1]};\n{extra}"
        f'  location / {{ return 200 "{name} $server_protocol $proxy_protocol_addr\\n"; }} }}\n'
    )


def curl(name: str | None, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """``curl -k https://name:port/`` with ``name`` resolved to the balancer (no SNI for None)."""
    host = name or "127.0.0.1"
    cmd = ["curl", "-sS", "-k", "--max-time", "10", "--interface", "127.0.0.7"]
    if name is not None:
        cmd += ["--resolve", f"{name}:{port}:127.0.0.1"]
    return subprocess.run(
        [*cmd, *args, f"https://{host}:{port}/"], capture_output=True, text=True, timeout=20
    )


@pytest.fixture
def routed(tmp_path: Path) -> Iterator[tuple[L4lb, int]]:
    """nginx with four TLS ports (pools api, web-h2 and web share www/shop names; default), and
    l4lb routing one listener over them; yields the balancer and its admin port."""
    ports = {pool: free_port() for pool in ("api", "web", "web-h2", "default")}
    certs = {n: make_cert(tmp_path / "certs", n) for n in NAMES}
    http = tls_server(ports["api"], "api.example.com", certs["api.example.com"])
    for pool in ("web", "web-h2"):  # one port, two server_names: nginx picks by the SNI
        http += tls_server(ports[pool], f"www.example.com-{pool}", certs["www.example.com"])
        http += tls_server(ports[pool], f"shop.example.com-{pool}", certs["shop.example.com"])
    http += tls_server(ports["default"], "default.test", certs["default.test"])
    # nginx picks a server block by server_name; answer with the pool in the name, so fix the
    # names nginx matches on: "www.example.com-web" etc. are not names clients send.
    http = http.replace("server_name www.example.com-web-h2;", "server_name www.example.com;")
    http = http.replace("server_name shop.example.com-web-h2;", "server_name shop.example.com;")
    http = http.replace("server_name www.example.com-web;", "server_name www.example.com;")
    http = http.replace("server_name shop.example.com-web;", "server_name shop.example.com;")
    bind_port, reject_port, admin_port = free_port(), free_port(), free_port()
    pools = "".join(
        f'\n[pools.{pool}]\nbackends = [{{ address = "127.0.0.1:{port}" }}]\n'
        for pool, port in ports.items()
    )
    config = f"""
workers = 1
drain_timeout = "2s"
[log]
access = "access.log"
[admin]
bind = "127.0.0.1:{admin_port}"

[[listeners]]
name = "tls"
bind = "127.0.0.1:{bind_port}"
pool = "default"
routes = [
  {{ sni = "api.example.com", pool = "api" }},
  {{ sni = "*.example.com", alpn = "h2", pool = "web-h2" }},
  {{ sni = "*.example.com", pool = "web" }},
]

[[listeners]]
name = "strict"
bind = "127.0.0.1:{reject_port}"
pool = "default"
default = "reject"
routes = [{{ sni = "api.example.com", pool = "api", name = "api" }}]
{pools}"""
    with (
        nginx(tmp_path / "nginx", http=http, wait=[("127.0.0.1", p) for p in ports.values()]),
        l4lb(tmp_path / "lb", config) as lb,
    ):
        yield lb, admin_port


def test_names_land_on_their_pools(routed: tuple[L4lb, int]) -> None:
    lb, admin_port = routed
    port = lb.port
    cases = [
        ("api.example.com", ["--http2"], "api.example.com HTTP/2.0"),
        ("www.example.com", ["--http2"], "www.example.com-web-h2 HTTP/2.0"),
        ("shop.example.com", ["--http2"], "shop.example.com-web-h2 HTTP/2.0"),
        ("www.example.com", ["--http1.1"], "www.example.com-web HTTP/1.1"),
        ("shop.example.com", ["--http1.1"], "shop.example.com-web HTTP/1.1"),
        ("default.test", ["--http1.1"], "default.test HTTP/1.1"),
    ]
    for name, args, expected in cases:
        result = curl(name, port, *args)
        assert result.returncode == 0, (name, result.stderr)
        assert result.stdout == f"{expected} 127.0.0.7\n", name
    no_sni = curl(None, port, "--http1.1")  # an IP literal: curl sends no SNI
    assert no_sni.returncode == 0, no_sni.stderr
    assert no_sni.stdout.startswith("default.test HTTP/1.1")

    lines = lb.wait_access(len(cases) + 1)
    got = [(x["sni"], x["alpn"], x["route"], x["pool"]) for x in lines]
    assert got == [
        ("api.example.com", "h2", "api.example.com", "api"),
        ("www.example.com", "h2", "*.example.com/h2", "web-h2"),
        ("shop.example.com", "h2", "*.example.com/h2", "web-h2"),
        ("www.example.com", "http/1.1", "*.example.com", "web"),
        ("shop.example.com", "http/1.1", "*.example.com", "web"),
        ("default.test", "http/1.1", "default", "default"),
        (None, "http/1.1", "default", "default"),
    ]
    assert {x["end"] for x in lines} <= {"client_closed", "backend_closed"}
    assert lines[1]["alpn_offers"] == ["h2", "http/1.1"]

    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    for route, count in [
        ("api.example.com", 1),
        ("*.example.com/h2", 2),
        ("*.example.com", 2),
        ("default", 2),
    ]:
        line = f'l4lb_route_connections_total{{listener="tls",route="{route}"}} {count}.0'
        assert line in metrics
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/status", timeout=10) as resp:
        status = json.load(resp)
    tls = next(x for x in status["listeners"] if x["name"] == "tls")
    assert tls["routes"]["default"] == 2


def test_reject_refuses_what_no_route_matches(routed: tuple[L4lb, int]) -> None:
    lb, _ = routed
    port = lb.binds[1][1]
    ok = curl("api.example.com", port, "--http1.1")
    assert ok.returncode == 0 and ok.stdout.startswith("api.example.com HTTP/1.1"), ok.stderr
    refused = curl("www.example.com", port, "--http1.1")
    assert refused.returncode != 0 and refused.stdout == ""
    lines = lb.wait_access(2)
    ends = sorted((x["route"] or "", x["end"], x["pool"] or "") for x in lines)
    assert ends[0] == ("", "no_route", "")
    assert ends[1][0] == "api" and ends[1][2] == "api"
    refusal = next(x for x in lines if x["end"] == "no_route")
    assert refusal["sni"] == "www.example.com" and "www.example.com" in refusal["detail"]


def test_l4lb_check_reports_unreachable_routes_and_missing_pools(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(
        """
[[listeners]]
name = "tls"
bind = "127.0.0.1:8443"
pool = "default"
routes = [
  { sni = "*.example.com", pool = "web" },
  { sni = "api.example.com", pool = "api" },
  { sni = "shop.example.com", pool = "shop" },
]
[pools.default]
backends = [{ address = "127.0.0.1:9001" }]
[pools.web]
backends = [{ address = "127.0.0.1:9002" }]
[pools.api]
backends = [{ address = "127.0.0.1:9003" }]
"""
    )
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "l4lb", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    out = result.stdout + result.stderr
    assert "listeners[0].routes[1]: unreachable: routes[0] ('*.example.com')" in out
    assert "listeners[0].routes[2]: unreachable" in out
    assert "listeners[0].routes[2].pool: no pool 'shop'" in out
    assert "Traceback" not in out


def test_a_reload_changes_where_a_name_goes(routed: tuple[L4lb, int]) -> None:
    lb, _ = routed
    assert curl("api.example.com", lb.port, "--http1.1").stdout.startswith("api.example.com")
    text = lb.config_path.read_text()
    lb.reload(
        text.replace(
            '{ sni = "api.example.com", pool = "api" }',
            '{ sni = "api.example.com", pool = "default" }',
        )
    )
    after = curl("api.example.com", lb.port, "--http1.1")
    assert after.returncode == 0 and after.stdout.startswith("default.test"), after
