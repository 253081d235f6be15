"""The servers' own commands with l4lb.backend: bad settings stop them at start with one line
naming the setting (no traceback, no worker restart loop), and the worker classes stay in charge.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from l4lb.proxy_protocol import build
from tests.backend.servers import closed_by_peer, http_get
from tests.support.peers import connect_from, free_port, stop_process, wait_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
APP = "tests.backend.servers:asgi_app"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("L4LB_")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=60
    )


def _gunicorn(*args: str) -> list[str]:
    return [str(BIN / "gunicorn"), "--no-control-socket", "-b", f"127.0.0.1:{free_port()}", *args]


BAD = {"L4LB_TRUSTED_PROXIES": "10.0.0.1/8"}
HINT = "write 10.0.0.0/8 for the block"


@pytest.mark.parametrize(
    "worker",
    [
        "l4lb.backend.gunicorn.SyncProxyWorker",
        "l4lb.backend.gunicorn.ThreadProxyWorker",
        "l4lb.backend.gunicorn_asgi.ProxyUvicornWorker",
        "l4lb.backend.gunicorn_aiohttp.ProxyWebWorker",
    ],
)
def test_gunicorn_bad_policy_stops_the_arbiter(worker: str) -> None:
    out = _run(_gunicorn("-w", "2", "-k", worker, "examples.flask_app:app"), **BAD)
    assert out.returncode == 1
    assert f"Error: {worker}: L4LB_TRUSTED_PROXIES" in out.stderr and HINT in out.stderr
    assert "Traceback" not in out.stderr and "Booting worker" not in out.stderr


def test_gunicorn_own_proxy_protocol_is_refused() -> None:
    args = _gunicorn("--proxy-protocol", "v2", "-k", "l4lb.backend.gunicorn.SyncProxyWorker")
    out = _run([*args, "examples.flask_app:app"], L4LB_TRUSTED_PROXIES="127.0.0.1/32")
    assert out.returncode == 1
    assert "turn gunicorn's --proxy-protocol off" in out.stderr
    assert "Traceback" not in out.stderr


def test_uvicorn_cli_bad_policy_exits_with_one_line() -> None:
    args = [str(BIN / "uvicorn"), APP, "--port", str(free_port()), "--no-proxy-headers"]
    out = _run([*args, "--http", "l4lb.backend.uvicorn:ProxyProtocolHTTP"], **BAD)
    assert out.returncode == 1
    assert "L4LB_TRUSTED_PROXIES" in out.stderr and HINT in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            'quic_bind = ["127.0.0.1:4433"]\n',
            "quic_bind: QUIC (HTTP/3) cannot carry a PROXY header",
        ),
        ("certfile = \n", "--config"),
        (None, "No such file"),
    ],
)
def test_hypercorn_bad_config_exits_with_one_line(
    config: str | None, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "hypercorn.toml"
    if config is not None:
        path.write_text(config)
    cmd = [sys.executable, "-m", "l4lb.backend.hypercorn", APP, "--config", str(path)]
    out = _run(cmd, L4LB_TRUSTED_PROXIES="127.0.0.1/32")
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert out.stderr.startswith("l4lb hypercorn: ") and "Traceback" not in out.stderr


def test_aiohttp_run_app_bad_policy_exits_with_one_line() -> None:
    out = _run(
        [sys.executable, "examples/aiohttp_app.py", "--bind", f"127.0.0.1:{free_port()}"], **BAD
    )
    assert out.returncode == 1
    assert out.stderr.startswith("l4lb.backend.aiohttp.run_app: L4LB_TRUSTED_PROXIES")
    assert HINT in out.stderr and "Traceback" not in out.stderr


def test_hypercorn_bad_policy_exits_with_one_line() -> None:
    out = _run([sys.executable, "-m", "l4lb.backend.hypercorn", APP], **BAD)
    assert out.returncode == 2
    assert out.stderr.startswith("l4lb hypercorn: L4LB_TRUSTED_PROXIES") and HINT in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "--workers 0: give 1 or more"),
        (["--workers", "2", "--ssl-certfile", "c.pem"], "--workers with --ssl-certfile"),
    ],
)
def test_serve_asgi_workers_errors(args: list[str], message: str) -> None:
    cmd = [sys.executable, "-m", "l4lb", "serve-asgi", APP, "--trusted", "127.0.0.1/32", *args]
    out = _run(cmd)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_gunicorn_threads_do_not_swap_out_the_sync_worker(tmp_path: Path) -> None:
    # gunicorn swaps a worker class whose name ends in "SyncWorker" for its plain gthread worker
    # when --threads > 1; ours must keep reading (and requiring) the PROXY header.
    port = free_port()
    args = [str(BIN / "gunicorn"), "--no-control-socket", "-b", f"127.0.0.1:{port}", "-w", "1"]
    args += ["--threads", "4", "-k", "l4lb.backend.gunicorn.SyncProxyWorker"]
    log = open(tmp_path / "gunicorn.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [*args, "examples.flask_app:app"],
        cwd=ROOT,
        env=_env(L4LB_TRUSTED_PROXIES="127.0.0.1/32"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port("127.0.0.1", port, timeout=30, proc=proc)
        with connect_from("127.0.0.1", "127.0.0.1", port) as s:
            s.sendall(build(2, ("192.0.2.7", 4321), ("127.0.0.1", port)))
            assert http_get(s)["client"] == ["192.0.2.7", 4321]
        with connect_from("127.0.0.1", "127.0.0.1", port) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # no header: refused
            assert closed_by_peer(s)
    finally:
        stop_process(proc, timeout=15)
        log.close()
    text = (tmp_path / "gunicorn.log").read_text()
    assert "Using worker: l4lb.backend.gunicorn.SyncProxyWorker" in text
    assert "PROXY rejected 127.0.0.1:" in text and "bad_header" in text


def _serve(tmp_path: Path, args: list[str], port: int, **env: str) -> subprocess.Popen[bytes]:
    log = open(tmp_path / "server.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(**env), stdout=log, stderr=subprocess.STDOUT)
    log.close()
    wait_port("127.0.0.1", port, timeout=30, proc=proc)
    return proc


def test_why_not_gunicorn_own_proxy_protocol(tmp_path: Path) -> None:
    """docs/backend.md's claim, shown: gunicorn's own --proxy-protocol serves a connection from a
    trusted balancer that sent no header under the balancer's address; ours refuses it."""
    base = [str(BIN / "gunicorn"), "--no-control-socket", "-w", "1"]
    own_port, our_port = free_port(), free_port()
    own = _serve(
        tmp_path,
        [
            *base,
            "-b",
            f"127.0.0.1:{own_port}",
            "--proxy-protocol",
            "auto",
            "examples.flask_app:app",
        ],
        own_port,
    )
    worker = ["-k", "l4lb.backend.gunicorn.SyncProxyWorker"]
    ours = _serve(
        tmp_path,
        [*base, "-b", f"127.0.0.1:{our_port}", *worker, "examples.flask_app:app"],
        our_port,
        L4LB_TRUSTED_PROXIES="127.0.0.1/32",
    )
    try:
        with connect_from("127.0.0.1", "127.0.0.1", own_port) as s:
            assert http_get(s)["client"][0] == "127.0.0.1"  # the balancer, taken for the client
        with connect_from("127.0.0.1", "127.0.0.1", our_port) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert closed_by_peer(s)
    finally:
        stop_process(own, timeout=15)
        stop_process(ours, timeout=15)


@pytest.mark.parametrize(
    ("worker", "extra"),
    [
        ("l4lb.backend.gunicorn.ThreadProxyWorker", ["-w", "1", "--threads", "2"]),
        ("l4lb.backend.gunicorn.SyncProxyWorker", ["-w", "2"]),
    ],
)
def test_gunicorn_silent_balancer_connection_times_out(
    worker: str, extra: list[str], tmp_path: Path
) -> None:
    """A trusted peer that sends nothing is closed at L4LB_HEADER_TIMEOUT with that reason,
    while another connection is served meanwhile."""
    port = free_port()
    args = [str(BIN / "gunicorn"), "--no-control-socket", "-b", f"127.0.0.1:{port}", *extra]
    proc = _serve(
        tmp_path,
        [*args, "-k", worker, "examples.flask_app:app"],
        port,
        L4LB_TRUSTED_PROXIES="127.0.0.1/32",
        L4LB_HEADER_TIMEOUT="1",
    )
    try:
        with connect_from("127.0.0.1", "127.0.0.1", port) as silent:
            with connect_from("127.0.0.1", "127.0.0.1", port) as s:
                s.sendall(build(1, ("192.0.2.8", 555), ("127.0.0.1", port)))
                assert http_get(s)["client"] == ["192.0.2.8", 555]
            assert closed_by_peer(silent, timeout=20)
    finally:
        stop_process(proc, timeout=15)
    text = (tmp_path / "server.log").read_text()
    assert "header_timeout (no complete PROXY header within 1s (0 bytes received))" in text


def test_hypercorn_workers_stopped_by_a_flood_of_sigterm_print_no_traceback(tmp_path: Path) -> None:
    """A supervisor's SIGTERM can reach a worker while asyncio.run closes its loop: the loop's
    close() shut the wake-up pipe before removing the signal handlers, and a signal in between
    printed "Exception ignored ... Bad file descriptor" with a traceback (seen in CI). The group
    gets SIGTERM again and again until the supervisor is gone, to hit that window."""
    port = free_port()
    args = [sys.executable, "-m", "l4lb.backend.hypercorn", "tests.backend.servers:asgi_app"]
    args += ["--bind", f"127.0.0.1:{port}", "--workers", "2"]
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115
    env = _env(L4LB_TRUSTED_PROXIES="127.0.0.1/32")
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_port("127.0.0.1", port, timeout=30, proc=proc)
        sent = 0
        while proc.poll() is None and sent < 200_000:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            sent += 1
            # paced, not a wait: unpaced, the flood fills the loop's wake-up pipe (64 KiB of
            # signal bytes unread while it shuts down) and asyncio warns of that instead
            time.sleep(0.0002)
        # 0, or SIGTERM itself once Python's finalization has put the default handler back
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()
    text = (tmp_path / "server.log").read_text(errors="replace")
    assert "Traceback" not in text and "Exception ignored" not in text, text
