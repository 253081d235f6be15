"""TLS passed through HAProxy (mode tcp, send-proxy-v2) and terminated by the worker right after
the PROXY header: gunicorn's own --certfile under SyncProxyWorker, hypercorn's certfile."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backend.servers import front_ends, http_get, make_cert, tls_client
from tests.support.peers import connect_from, free_port, wait_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _commands(port: int, cert: str, key: str, tmp: Path) -> dict[str, list[str]]:
    config = tmp / "hypercorn.toml"
    config.write_text(f'certfile = "{cert}"\nkeyfile = "{key}"\n')
    return {
        "gunicorn-sync": [
            str(BIN / "gunicorn"),
            "--no-control-socket",
            "-b",
            f"127.0.0.1:{port}",
            "-w",
            "2",
            "--certfile",
            cert,
            "--keyfile",
            key,
            "-k",
            "l4lb.backend.gunicorn.SyncProxyWorker",
            "examples.flask_app:app",
        ],
        "hypercorn": [
            sys.executable,
            "-m",
            "l4lb.backend.hypercorn",
            "tests.backend.servers:asgi_app",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
            "--config",
            str(config),
        ],
    }


@pytest.fixture
def tls_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[int, str]]:
    cert, key = make_cert(tmp_path)
    port = free_port()
    args = _commands(port, cert, key, tmp_path)[request.param]
    env = dict(os.environ, PYTHONPATH=str(ROOT), L4LB_TRUSTED_PROXIES="127.0.0.1/32")
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_port("127.0.0.1", port, timeout=30, proc=proc)
        yield port, cert
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        log.close()


@pytest.mark.parametrize("tls_server", ["gunicorn-sync", "hypercorn"], indirect=True)
def test_tls_after_the_header(tls_server: tuple[int, str], tmp_path: Path) -> None:
    port, cert = tls_server
    with front_ends(tmp_path / "fronts", port) as fronts:
        for name in ("haproxy-v1", "haproxy-v2", "nginx"):
            for ip in ("127.0.0.7", "127.0.0.8"):
                s = connect_from(ip, "127.0.0.1", fronts[name], timeout=15)
                own = [ip, s.getsockname()[1]]
                with tls_client(s, cert) as t:
                    assert http_get(t)["client"] == own, name
