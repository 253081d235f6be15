"""``state_file``: a drained or disabled backend stays so across a restart (HAProxy's
server-state-file); a corrupt or stale file is reported and ignored, never fatal."""

from __future__ import annotations

import json
from pathlib import Path

from tests.service.helpers import admin_get, admin_post
from tests.support.echo_backend import EchoBackend
from tests.support.l4lb import config_text, start_l4lb
from tests.support.peers import free_port, stop_process, wait_for


def _config(lb_port: int, admin_port: int, backends: list[str], state: Path) -> str:
    text = config_text(f"127.0.0.1:{lb_port}", backends, top={"state_file": str(state)})
    return text + f'\n[admin]\nbind = "127.0.0.1:{admin_port}"\n'


def _saved(state: Path) -> dict[str, str] | None:
    if not state.exists():  # replaced by a rename: never seen half-written
        return None
    pools: dict[str, dict[str, dict[str, str]]] = json.loads(state.read_text())["pools"]
    return {address: entry["state"] for address, entry in pools.get("main", {}).items()}


def _states(admin_port: int) -> dict[str, str]:
    _, status = admin_get(admin_port, "/status")
    return {b["address"]: b["state"] for b in status["pools"][0]["backends"]}


def test_a_drained_backend_stays_drained_after_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "var" / "state.json"
    state.parent.mkdir()
    lb_port, admin_port = free_port(), free_port()
    with EchoBackend("a") as a, EchoBackend("b") as b, EchoBackend("c") as c:
        config = _config(lb_port, admin_port, [a.address, b.address, c.address], state)
        lb = start_l4lb(tmp_path / "lb", config)
        try:
            assert admin_post(admin_port, f"/pools/main/backends/{a.address}/drain")[0] == 200
            assert admin_post(admin_port, f"/pools/main/backends/{b.address}/disable")[0] == 200
            wanted = {a.address: "drain", b.address: "disabled"}
            assert wait_for(lambda: _saved(state) == wanted, 10), state.read_text()
        finally:
            stop_process(lb.proc)
        lb = start_l4lb(tmp_path / "lb2", config)
        try:
            states = _states(admin_port)
            assert states[a.address] == "drain" and states[b.address] == "disabled", states
            assert states[c.address] == "up", states
            assert "event=state_restored" in lb.log_text() and "backends=2" in lb.log_text()
            # enabled again: gone from the file, and up after the next restart
            assert admin_post(admin_port, f"/pools/main/backends/{a.address}/enable")[0] == 200
            assert wait_for(lambda: a.address not in state.read_text(), 10)
        finally:
            stop_process(lb.proc)


def test_a_corrupt_or_stale_file_is_reported_and_ignored(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    lb_port, admin_port = free_port(), free_port()
    with EchoBackend("a") as a:
        config = _config(lb_port, admin_port, [a.address], state)
        state.write_text('{"version": 2, "pools": {"main": {')  # cut short
        lb = start_l4lb(tmp_path / "lb", config)
        try:
            assert _states(admin_port) == {a.address: "up"}
            assert "event=state_file_ignored" in lb.log_text()
            assert "not JSON" in lb.log_text()
        finally:
            stop_process(lb.proc)
        state.write_text(
            json.dumps({"version": 1, "pools": {"main": {"127.0.0.1:1": "drain"}, "gone": {}}})
        )
        lb = start_l4lb(tmp_path / "lb2", config)
        try:
            assert _states(admin_port) == {a.address: "up"}
            assert "event=state_entry_stale" in lb.log_text()
            assert "backend=127.0.0.1:1" in lb.log_text()
        finally:
            stop_process(lb.proc)
