"""WebSockets keep the real client through real HAProxy (send-proxy-v2) and l4lb, on each server
that has them, started by its own command with several workers (and uvicorn's --reload)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.sync.client import connect as ws_connect

from tests.support.l4lb import config_text, l4lb
from tests.support.peers import connect_from, free_port, haproxy, wait_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
APP = "tests.backend.servers:asgi_app"
UVICORN_CLASS = "--no-proxy-headers --http l4lb.backend.uvicorn:ProxyProtocolHTTP"
GUNICORN = "{bin}/gunicorn --no-control-socket -b 127.0.0.1:{port} -w 2 -k"

# Each server's own command; {bin}, {port}, {tmp} and {python} are filled in per test.
SERVERS = {
    "uvicorn-workers": f"{{bin}}/uvicorn {APP} --port {{port}} --workers 2 {UVICORN_CLASS}",
    "uvicorn-reload": f"{{bin}}/uvicorn {APP} --port {{port}} --reload --reload-dir {{tmp}} "
    + UVICORN_CLASS,
    "gunicorn-uvicorn": f"{GUNICORN} l4lb.backend.gunicorn_asgi.ProxyUvicornWorker {APP}",
    "hypercorn": f"{{python}} -m l4lb.backend.hypercorn {APP} --bind 127.0.0.1:{{port}} "
    "--workers 2",
    "aiohttp-gunicorn": f"{GUNICORN} l4lb.backend.gunicorn_aiohttp.ProxyWebWorker "
    "examples.aiohttp_app:app",
}


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[int]:
    port = free_port()
    command = SERVERS[request.param]
    args = command.format(bin=BIN, port=port, tmp=tmp_path, python=sys.executable).split()
    env = dict(os.environ, PYTHONPATH=str(ROOT), L4LB_TRUSTED_PROXIES="127.0.0.1/32")
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_port("127.0.0.1", port, timeout=30, proc=proc)
        yield port
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        log.close()
    text = (tmp_path / "server.log").read_text(errors="replace")
    assert "Traceback" not in text, text


@pytest.mark.parametrize("server", sorted(SERVERS), indirect=True)
def test_websocket_keeps_the_client(server: int, tmp_path: Path) -> None:
    hport, lport = free_port(), free_port()
    body = (
        f"listen ws\n    bind 127.0.0.1:{hport}\n    server app 127.0.0.1:{server} send-proxy-v2\n"
    )
    config = config_text(f"127.0.0.1:{lport}", [f"127.0.0.1:{server}"], pool={"send_proxy": "v2"})
    with (
        haproxy(tmp_path / "haproxy", body, wait=[("127.0.0.1", hport)]),
        l4lb(tmp_path / "l4lb", config),
    ):
        for front in (hport, lport):
            for ip in ("127.0.0.7", "127.0.0.8"):
                s = connect_from(ip, "127.0.0.1", front, timeout=15)
                own = [ip, s.getsockname()[1]]
                with ws_connect(f"ws://127.0.0.1:{front}/ws", sock=s, open_timeout=15) as ws:
                    assert json.loads(ws.recv(timeout=15))["client"] == own, front
                    for text in ("a", "b"):
                        ws.send(text)
                        assert ws.recv(timeout=15) == "echo " + text
