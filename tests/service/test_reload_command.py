"""``l4lb reload``: validates, signals (or calls the admin API), waits for the outcome, and
fails when the running balancer refused the file; ``l4lb_reloads_total{result}`` counts both."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.helpers import admin_get
from tests.support.echo_backend import EchoBackend
from tests.support.l4lb import config_text, start_l4lb
from tests.support.peers import free_port, stop_process, wait_for


def _reload(
    config: Path, *args: str, env_dir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if env_dir is not None:
        env["L4LB_RUNTIME_DIR"] = str(env_dir)
    return subprocess.run(
        [sys.executable, "-m", "l4lb", "reload", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def _metrics(admin_port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def _config(lb_port: int, admin_port: int, backend: str, weight: int = 1, **top: object) -> str:
    text = config_text(
        f"127.0.0.1:{lb_port}", [{"address": backend, "weight": weight}], top=top or None
    )
    return text + f'\n[admin]\nbind = "127.0.0.1:{admin_port}"\n'


def _with_second_listener(text: str, bind: str) -> str:
    return text.replace(
        "\n[pools.main]",
        f'\n[[listeners]]\nname = "second"\nbind = "{bind}"\npool = "main"\n\n[pools.main]',
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_reload_by_signal_reports_applied_and_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.setenv("L4LB_RUNTIME_DIR", str(run_dir))  # inherited by the balancer
    lb_port, admin_port = free_port(), free_port()
    with EchoBackend("echo") as backend:
        config = _config(lb_port, admin_port, backend.address, workers=workers)
        lb = start_l4lb(tmp_path / "lb", config)
        try:
            config = _config(lb_port, admin_port, backend.address, 5, workers=workers)
            lb.write_config(config)
            done = _reload(lb.config_path, "--pid", str(lb.pid))
            assert done.returncode == 0, (done.stdout, done.stderr, lb.log_text())
            assert f"event=reloaded pid={lb.pid}" in done.stdout
            # valid on paper, refused by the running balancer: the port is taken
            with socket.socket() as taken:
                taken.bind(("127.0.0.1", 0))
                taken.listen()
                busy = f"127.0.0.1:{taken.getsockname()[1]}"
                lb.write_config(_with_second_listener(config, busy))
                refused = _reload(lb.config_path, "--pid", str(lb.pid))
            assert refused.returncode == 1, (refused.stdout, refused.stderr, lb.log_text())
            assert "event=reload_rejected" in refused.stderr, refused.stderr
            assert wait_for(lambda: "reloads" in _metrics(admin_port), 10)
            metrics = _metrics(admin_port)
            assert 'l4lb_reloads_total{result="applied"} 1.0' in metrics, metrics
            # with workers = 2 the supervisor refuses the bind: counted once all the same
            assert 'l4lb_reloads_total{result="refused"} 1.0' in metrics, metrics
            # still serving the applied config (the refused one's second listener is not there)
            _, status = admin_get(admin_port, "/status")
            assert [lst["name"] for lst in status["listeners"]] == ["main"]
            assert status["pools"][0]["backends"][0]["weight"] == 5
        finally:
            stop_process(lb.proc)


def test_an_invalid_file_is_not_sent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("L4LB_RUNTIME_DIR", str(tmp_path))
    lb_port, admin_port = free_port(), free_port()
    with EchoBackend("echo") as backend:
        lb = start_l4lb(tmp_path / "lb", _config(lb_port, admin_port, backend.address))
        try:
            lb.write_config("[[listeners]]\nname = 1\n")
            done = _reload(lb.config_path, "--pid", str(lb.pid))
            assert done.returncode == 1
            assert "nothing was sent" in done.stderr
            assert "event=reload" not in lb.log_text()  # no SIGHUP reached it
        finally:
            stop_process(lb.proc)


def test_reload_through_the_admin_api(tmp_path: Path) -> None:
    lb_port, admin_port = free_port(), free_port()
    with EchoBackend("echo") as backend:
        config = _config(lb_port, admin_port, backend.address)
        lb = start_l4lb(tmp_path / "lb", config)
        try:
            lb.write_config(_config(lb_port, admin_port, backend.address, 3))
            done = _reload(lb.config_path)  # no pid: [admin] is used
            assert done.returncode == 0, (done.stdout, done.stderr)
            assert "event=reloaded via=admin_api" in done.stdout
            with socket.socket() as taken:
                taken.bind(("127.0.0.1", 0))
                taken.listen()
                busy = f"127.0.0.1:{taken.getsockname()[1]}"
                lb.write_config(_with_second_listener(config, busy))
                refused = _reload(lb.config_path)
            assert refused.returncode == 1, (refused.stdout, refused.stderr)
            assert "event=reload_rejected via=admin_api" in refused.stderr
        finally:
            stop_process(lb.proc)


def test_no_such_process(tmp_path: Path) -> None:
    path = tmp_path / "l4lb.toml"
    path.write_text(config_text("127.0.0.1:1", ["127.0.0.1:2"]))
    gone = subprocess.Popen(["true"])
    gone.wait()
    done = _reload(path, "--pid", str(gone.pid), env_dir=tmp_path)
    assert done.returncode == 1
    assert f"no process {gone.pid}" in done.stderr
