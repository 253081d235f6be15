"""With ``workers = 2`` each reload is counted once: ``l4lb_reloads_total{result}`` and
``last_reload`` are the supervisor's count, whichever worker answers the admin API (also one
the supervisor restarted), and systemd gets one ``STATUS=`` per reload, from the supervisor."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.service.helpers import admin_post, worker_snapshots
from tests.support.echo_backend import EchoBackend
from tests.support.l4lb import L4lb, config_text, start_l4lb
from tests.support.peers import free_port, stop_process, wait_for


def _config(lb_port: int, admin_port: int, backend: str, weight: int = 1) -> str:
    text = config_text(
        f"127.0.0.1:{lb_port}", [{"address": backend, "weight": weight}], top={"workers": 2}
    )
    return text + f'\n[admin]\nbind = "127.0.0.1:{admin_port}"\n'


def _metric(admin_port: int, result: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(f'l4lb_reloads_total{{result="{result}"}} '):
                return float(line.split()[-1])
    raise AssertionError(f"no l4lb_reloads_total{{result={result!r}}}")


def _listen(sock: socket.socket, heard: list[str]) -> None:
    """Collect the sd_notify messages until the socket is shut down."""
    while message := sock.recv(4096):
        heard.append(message.decode())


def _serving(admin_port: int) -> bool:
    """The admin API answers (after the worker holding it died, another takes it over)."""
    try:
        _metric(admin_port, "applied")
    except OSError:
        return False
    return True


def _reload(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "l4lb", "reload", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _outcome_after(run_dir: Path, since: float) -> dict[str, object] | None:
    """The reload outcome written for ``l4lb reload`` after ``since``, if any yet."""
    try:
        doc: dict[str, object] = json.loads((run_dir / "reload-status.json").read_text())
    except (OSError, ValueError):
        return None
    return doc if float(str(doc["time"])) >= since else None


def _every_worker_counts(lb: L4lb) -> set[tuple[int, int]]:
    return {(s["reloads"], s["reloads_refused"]) for s in worker_snapshots(lb.pid).values()}


def test_each_reload_counted_once_with_two_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    notify_path = tmp_path / "notify.sock"
    monkeypatch.setenv("L4LB_RUNTIME_DIR", str(run_dir))  # inherited by the balancer
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
    lb_port, admin_port = free_port(), free_port()
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
        EchoBackend("echo") as backend,
    ):
        notify.bind(str(notify_path))
        heard: list[str] = []  # read as it comes, as systemd does (a full queue drops)
        listening = threading.Thread(target=_listen, args=(notify, heard), daemon=True)
        listening.start()
        config = _config(lb_port, admin_port, backend.address)
        lb = start_l4lb(tmp_path / "lb", config)
        try:
            assert wait_for(lambda: "event=workers_started" in lb.log_text(), 20)
            assert wait_for(lambda: len(worker_snapshots(lb.pid)) == 2, 20)
            # 1. a signalled reload, applied by both workers: one
            lb.write_config(_config(lb_port, admin_port, backend.address, 5))
            done = _reload(lb.config_path, "--pid", str(lb.pid))
            assert done.returncode == 0, (done.stdout, done.stderr, lb.log_text())
            assert (_metric(admin_port, "applied"), _metric(admin_port, "refused")) == (1, 0)
            # 2. refused by the supervisor (the new listener's port is taken): one, and fails
            with socket.socket() as taken:
                taken.bind(("127.0.0.1", 0))
                taken.listen()
                busy = f"127.0.0.1:{taken.getsockname()[1]}"
                second = f'\n[[listeners]]\nname = "second"\nbind = "{busy}"\npool = "main"\n'
                lb.write_config(_config(lb_port, admin_port, backend.address, 5) + second)
                refused = _reload(lb.config_path, "--pid", str(lb.pid))
            assert refused.returncode == 1, (refused.stdout, refused.stderr, lb.log_text())
            assert (_metric(admin_port, "applied"), _metric(admin_port, "refused")) == (1, 1)
            # 3. refused by both workers (a plain SIGHUP with a broken file): one
            lb.write_config(config.replace('pool = "main"', 'pool = "nowhere"'))
            since = time.time()
            lb.proc.send_signal(signal.SIGHUP)
            assert wait_for(lambda: _outcome_after(run_dir, since) is not None, 20), lb.log_text()
            assert _outcome_after(run_dir, since)["applied"] is False  # type: ignore[index]
            assert (_metric(admin_port, "applied"), _metric(admin_port, "refused")) == (1, 2)
            # 4. through the admin API (one worker runs it for both): one
            lb.write_config(config)
            assert admin_post(admin_port, "/reload")[0] == 200
            assert (_metric(admin_port, "applied"), _metric(admin_port, "refused")) == (2, 2)
            assert _every_worker_counts(lb) == {(2, 2)}
            # 5. a worker the supervisor restarts shows the same count, not its own zero
            victim = next(iter(worker_snapshots(lb.pid)))
            os.kill(victim, signal.SIGKILL)
            assert wait_for(
                lambda: (
                    len(worker_snapshots(lb.pid)) == 2 and victim not in worker_snapshots(lb.pid)
                ),
                20,
            )
            assert _every_worker_counts(lb) == {(2, 2)}
            assert wait_for(lambda: _serving(admin_port), 20)  # the API is back (if it moved)
            assert (_metric(admin_port, "applied"), _metric(admin_port, "refused")) == (2, 2)
        finally:
            stop_process(lb.proc)
        # systemd heard one STATUS per reload, in order (not one per worker)
        notify.shutdown(socket.SHUT_RDWR)
        listening.join(10)
        statuses = [
            line[7:]
            for message in heard
            for line in message.split("\n")
            if line.startswith("STATUS=")
        ]
        reloads = [s for s in statuses if s.startswith("reload ")]
        assert [s.split(":")[0].split(";")[0] for s in reloads] == [
            "reload applied (1)",
            "reload refused",
            "reload refused",
            "reload applied (2)",
        ], statuses
