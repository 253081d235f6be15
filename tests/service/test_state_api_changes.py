"""``state_file`` keeps what the admin API changed across real restarts of ``l4lb run``:
backends added (and removed), weights and max_conns set, drain/disable states; with
``workers = 2`` every worker comes back with the same state. Stale entries are reported once."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.service.helpers import admin_get, admin_post, backends_of, worker_snapshots
from tests.support.echo_backend import EchoBackend, echo_through
from tests.support.l4lb import L4lb, config_text, start_l4lb
from tests.support.peers import free_port, stop_process, wait_for


def _config(lb_port: int, admin_port: int, backends: list[Any], state: Path, workers: int) -> str:
    top = {"state_file": str(state), "workers": workers}
    text = config_text(f"127.0.0.1:{lb_port}", backends, top=top)
    return text + f'\n[admin]\nbind = "127.0.0.1:{admin_port}"\n'


def _start(workdir: Path, config: str, admin_port: int, workers: int) -> L4lb:
    lb = start_l4lb(workdir, config)
    if workers > 1:  # every worker serves (its private admin socket too)
        assert wait_for(lambda: "event=workers_started" in lb.log_text(), 20), lb.log_text()
        assert wait_for(lambda: len(worker_snapshots(lb.pid)) == workers, 20)
    assert wait_for(lambda: _answers(admin_port), 20)
    return lb


def _answers(admin_port: int) -> bool:
    try:
        return admin_get(admin_port, "/ready")[0] in (200, 503)
    except OSError:
        return False


def _every_worker(lb: L4lb, workers: int, admin_port: int) -> list[dict[str, dict[str, Any]]]:
    """Each worker's own view of pool main (one view with a single process)."""
    if workers == 1:
        return [backends_of(admin_get(admin_port, "/snapshot")[1])]
    views = worker_snapshots(lb.pid)
    assert len(views) == workers, views.keys()
    return [backends_of(v) for v in views.values()]


def _saved(state: Path) -> dict[str, Any] | None:
    if not state.exists():  # replaced by a rename: never seen half-written
        return None
    pools: dict[str, Any] = json.loads(state.read_text())["pools"]
    return pools


@pytest.mark.parametrize("workers", [1, 2])
def test_api_changes_survive_a_restart_in_every_worker(tmp_path: Path, workers: int) -> None:
    state = tmp_path / "state.json"
    lb_port, admin_port = free_port(), free_port()
    with (
        EchoBackend("a") as a,
        EchoBackend("b") as b,
        EchoBackend("c") as c,
        EchoBackend("d") as d,
    ):
        config = _config(lb_port, admin_port, [a.address, b.address], state, workers)
        lb = _start(tmp_path / "lb", config, admin_port, workers)
        try:
            calls = [
                f"/pools/main/backends/{c.address}/add?weight=3&max_conns=7",
                f"/pools/main/backends/{d.address}/add",
                f"/pools/main/backends/{d.address}/remove",
                f"/pools/main/backends/{b.address}/set?weight=5",
                f"/pools/main/backends/{a.address}/drain",
            ]
            for call in calls:
                status, doc = admin_post(admin_port, call)
                assert status == 200 and "workers_failed" not in doc, (call, doc)
            wanted = {
                "main": {
                    a.address: {"state": "drain"},
                    b.address: {
                        "set": {
                            "weight": 5,
                            "max_conns": None,
                            "over": {"weight": 1, "max_conns": None},
                        }
                    },
                    c.address: {"added": {"weight": 3, "max_conns": 7, "send_proxy": "v2"}},
                }
            }
            assert wait_for(lambda: _saved(state) == wanted, 10), state.read_text()
        finally:
            stop_process(lb.proc)
        lb = _start(tmp_path / "lb2", config, admin_port, workers)
        try:
            expected = {
                a.address: {"state": "drain", "weight": 1, "max_conns": None, "origin": "config"},
                b.address: {"state": "up", "weight": 5, "max_conns": None, "origin": "config"},
                c.address: {"state": "up", "weight": 3, "max_conns": 7, "origin": "api"},
            }
            for view in _every_worker(lb, workers, admin_port):
                assert view == expected
            assert lb.log_text().count("event=state_restored") == workers
            # the restored pool serves: the API's backend takes connections, the drained none
            served = {echo_through("127.0.0.1", lb_port, b"x")[0] for _ in range(24)}
            assert "c" in served and "a" not in served, served
            # an API change after the restart still reaches every worker, and the file
            assert admin_post(admin_port, f"/pools/main/backends/{a.address}/enable")[0] == 200
            assert admin_post(admin_port, f"/pools/main/backends/{c.address}/remove")[0] == 200
            saved = lambda: _saved(state) or {}  # noqa: E731
            assert wait_for(lambda: set(saved().get("main", {})) == {b.address}, 10), saved()
            for view in _every_worker(lb, workers, admin_port):
                assert view[a.address]["state"] == "up" and c.address not in view, view
            if workers > 1:  # a worker the supervisor restarts comes back with the file's state
                victim = next(iter(worker_snapshots(lb.pid)))
                os.kill(victim, signal.SIGKILL)
                assert wait_for(
                    lambda: (
                        len(views := worker_snapshots(lb.pid)) == workers and victim not in views
                    ),
                    20,
                )
                for view in _every_worker(lb, workers, admin_port):
                    assert view[a.address]["state"] == "up" and c.address not in view, view
                    assert view[b.address]["weight"] == 5, view
        finally:
            stop_process(lb.proc)


def test_stale_entries_are_reported_once_and_dropped(tmp_path: Path) -> None:
    """A pool the config lost, a weight set over a value the config changed since: reported
    once (by one of two workers, and not again at the next start); a backend that the API
    added and the config now lists keeps the state's admin state."""
    state = tmp_path / "state.json"
    lb_port, admin_port = free_port(), free_port()
    with EchoBackend("a") as a, EchoBackend("b") as b:
        state.write_text(
            json.dumps(
                {
                    "version": 2,
                    "pools": {
                        "gone": {"192.0.2.10:80": {"added": {"weight": 1, "max_conns": None}}},
                        "main": {
                            a.address: {
                                "set": {
                                    "weight": 9,
                                    "max_conns": None,
                                    "over": {"weight": 1, "max_conns": None},
                                }
                            },
                            b.address: {
                                "state": "disabled",
                                "added": {"weight": 1, "max_conns": None},
                            },
                        },
                    },
                }
            )
        )
        backends = [{"address": a.address, "weight": 2}, b.address]
        config = _config(lb_port, admin_port, backends, state, 2)
        lb = _start(tmp_path / "lb", config, admin_port, 2)
        try:
            for view in _every_worker(lb, 2, admin_port):
                assert view[a.address]["weight"] == 2, view  # the config changed: its value
                assert view[b.address]["state"] == "disabled", view
                assert view[b.address]["origin"] == "config", view
            log = lb.log_text()
            assert log.count("event=state_pool_stale") == 1, log
            assert log.count("event=state_entry_stale") == 1, log
            assert "pool=gone" in log and "the config gives weight=2" in log
            # dropped from the file at once: what is in force is what it keeps
            main = {b.address: {"state": "disabled"}}
            assert wait_for(lambda: _saved(state) == {"main": main}, 10), state.read_text()
        finally:
            stop_process(lb.proc)
        lb = _start(tmp_path / "lb2", config, admin_port, 2)
        try:
            log = lb.log_text()
            assert "_stale " not in log and "stale=0" in log, log
            for view in _every_worker(lb, 2, admin_port):
                assert view[b.address]["state"] == "disabled", view
        finally:
            stop_process(lb.proc)


def test_a_corrupt_or_unreadable_file_is_one_warning(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    lb_port, admin_port = free_port(), free_port()
    with EchoBackend("a") as a:
        config = _config(lb_port, admin_port, [a.address], state, 2)
        state.write_bytes(b'{"version": 2, "pools": {"main": {"\xff')
        lb = _start(tmp_path / "lb", config, admin_port, 2)
        try:
            for view in _every_worker(lb, 2, admin_port):
                assert view[a.address]["state"] == "up", view
            log = lb.log_text()
            assert log.count("event=state_file_ignored") == 1, log
            assert "not UTF-8" in log and "moved aside" in log
            assert (tmp_path / "state.json.bad").exists()  # kept for a look, not read again
            assert admin_post(admin_port, f"/pools/main/backends/{a.address}/drain")[0] == 200
            assert wait_for(lambda: _saved(state) == {"main": {a.address: {"state": "drain"}}})
        finally:
            stop_process(lb.proc)
        state.unlink()
        state.mkdir()  # a path run could never write: refused at start as l4lb check refuses it
        with pytest.raises(
            RuntimeError, match=r"(?s)exit 1.*state_file: cannot write .*Is a directory"
        ):
            _start(tmp_path / "lb2", config, admin_port, 2)
