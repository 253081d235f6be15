"""``workers = 2``: a reload that removes, moves, re-adds or adds listeners, on real processes.

The supervisor holds a copy of every listening socket. A removed listener's port must refuse
connections (not accept them into a queue nobody reads), and an added one must be served by
every worker, steered like the first ones, also when a worker is restarting during the reload.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.balancer.helpers import Backend, backend, hello
from tests.support.l4lb import L4lb, l4lb
from tests.support.peers import free_port, wait_for

CLIENTS = [f"127.0.{n}.{i}" for n in (1, 2) for i in range(1, 21)]


def config(be: Backend, listeners: dict[str, int]) -> str:
    text = 'workers = 2\ndrain_timeout = "5s"\n\n[log]\naccess = "access.log"\n'
    for name, port in listeners.items():
        text += f'\n[[listeners]]\nname = "{name}"\nbind = "127.0.0.1:{port}"\npool = "p"\n'
    return text + f'\n[pools.p]\nbackends = [{{ address = "{be.address}" }}]\n'


def served(port: int, source: str) -> bool:
    with socket.socket() as s:
        s.settimeout(5)
        s.bind((source, 0))
        try:
            s.connect(("127.0.0.1", port))
            return s.recv(100).startswith(b"client=")
        except OSError:
            return False


def refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex(("127.0.0.1", port)) != 0


def all_served(port: int) -> bool:
    return all(served(port, ip) for ip in CLIENTS)


def reload(lb: L4lb, text: str) -> None:
    """SIGHUP with ``text``; wait until both workers applied it."""
    before = lb.log_text().count("event=reloaded")
    lb.reload(text, wait_for_log=False)
    assert wait_for(lambda: lb.log_text().count("event=reloaded") >= before + 2, 20), lb.log_text()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[L4lb, Backend, dict[str, int]]]:
    ports = {"a": free_port(), "b": free_port()}
    with backend(hello) as be, l4lb(tmp_path, config(be, ports)) as lb:
        assert wait_for(lambda: lb.log_text().count("event=started") == 2, 20)
        assert all_served(ports["b"])
        yield lb, be, ports


def test_a_removed_listener_refuses_connections(
    running: tuple[L4lb, Backend, dict[str, int]],
) -> None:
    lb, be, ports = running
    reload(lb, config(be, {"a": ports["a"]}))
    assert refused(ports["b"]), "the removed listener's port still accepts connections"
    assert all_served(ports["a"])
    lb.wait_log("event=listener_closed")


def test_a_moved_listener_leaves_its_old_port_and_serves_on_the_new(
    running: tuple[L4lb, Backend, dict[str, int]],
) -> None:
    lb, be, ports = running
    moved = free_port()
    reload(lb, config(be, {"a": ports["a"], "b": moved}))
    assert refused(ports["b"])
    assert all_served(moved)


def test_a_listener_removed_then_added_back_serves_every_client(
    running: tuple[L4lb, Backend, dict[str, int]],
) -> None:
    lb, be, ports = running
    reload(lb, config(be, {"a": ports["a"]}))
    assert refused(ports["b"])
    reload(lb, config(be, ports))
    assert all_served(ports["b"]), lb.log_text()


def test_a_renamed_listener_keeps_serving_on_its_port(
    running: tuple[L4lb, Backend, dict[str, int]],
) -> None:
    lb, be, ports = running
    reload(lb, config(be, {"a": ports["a"], "b2": ports["b"]}))
    assert all_served(ports["b"]), lb.log_text()


def test_a_listener_added_while_a_worker_restarts_is_served_by_both(
    running: tuple[L4lb, Backend, dict[str, int]],
) -> None:
    lb, be, ports = running
    pids = [
        int(x.split("pid=")[1].split()[0])
        for x in lb.log_text().splitlines()
        if "event=worker_started" in x
    ]
    os.kill(pids[0], signal.SIGKILL)
    # the reload lands while the replacement is still starting (forked, not yet serving)
    assert wait_for(lambda: lb.log_text().count("event=worker_started") == 3, 20)
    added = {**ports, "c": free_port()}
    lb.reload(config(be, added), wait_for_log=False)
    assert wait_for(lambda: lb.log_text().count("event=started") == 3, 20)
    assert wait_for(lambda: all_served(added["c"]), 30), lb.log_text()
    assert all_served(ports["a"])


def test_two_sighups_at_once_leave_one_consistent_set_of_listeners(
    running: tuple[L4lb, Backend, dict[str, int]],
) -> None:
    """Both signals may reach the workers as one (signals coalesce): nothing may be left over."""
    lb, be, ports = running
    c = free_port()
    lb.write_config(config(be, {"a": ports["a"], "c": c}))
    lb.proc.send_signal(signal.SIGHUP)
    lb.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "event=reload_forwarded" in lb.log_text(), 20)
    assert wait_for(lambda: all_served(c), 30), lb.log_text()
    assert wait_for(lambda: refused(ports["b"]), 30), lb.log_text()
    assert all_served(ports["a"])


def test_a_reload_that_cannot_bind_is_refused_by_the_supervisor(
    running: tuple[L4lb, Backend, dict[str, int]],
) -> None:
    lb, be, ports = running
    with socket.socket() as taken:  # no SO_REUSEPORT: nobody may share this port
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        lb.reload(config(be, {**ports, "c": busy}), wait_for_log=False)
        assert wait_for(lambda: "event=reload_rejected" in lb.log_text(), 20), lb.log_text()
        assert "event=reload_forwarded" not in lb.log_text()
    assert all_served(ports["b"])
    assert "event=reloaded" not in lb.log_text()


def test_a_worker_crashing_in_a_loop_is_restarted_with_a_growing_back_off(
    running: tuple[L4lb, Backend, dict[str, int]],
) -> None:
    lb, _, ports = running
    for crash in range(1, 5):
        last = [x for x in lb.log_text().splitlines() if "event=worker_started" in x][-1]
        os.kill(int(last.split("pid=")[1].split()[0]), signal.SIGKILL)
        assert wait_for(lambda n=crash: lb.log_text().count("event=worker_started") == 2 + n, 30), (
            lb.log_text()
        )
    backoffs = [
        float(x.split("restart_in=")[1].rstrip("s"))
        for x in lb.log_text().splitlines()
        if "event=worker_crashed" in x
    ]
    assert backoffs == [0.1, 0.2, 0.4, 0.8]
    assert wait_for(lambda: all_served(ports["a"]), 30)


def test_a_burst_of_sighups_leaves_the_supervisor_alive(
    running: tuple[L4lb, Backend, dict[str, int]],
) -> None:
    """While the supervisor's main thread is busy with one reload, the next SIGHUP must wait for
    it: delivered to a helper thread (the log writer) its default action killed the process."""
    lb, be, ports = running
    lb.write_config(config(be, {**ports, "c": free_port()}))
    for _ in range(50):
        lb.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "event=reload_forwarded" in lb.log_text(), 20)
    assert lb.proc.poll() is None, lb.log_text()
    assert all_served(ports["a"])
    # every thread but the main one blocks every signal
    main = lb.pid
    for tid in os.listdir(f"/proc/{main}/task"):
        if int(tid) == main:
            continue
        with open(f"/proc/{main}/task/{tid}/status") as f:
            blocked = int(next(x for x in f if x.startswith("SigBlk:")).split()[1], 16)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            assert blocked & (1 << (sig - 1)), f"thread {tid} can take {sig.name}"


def test_a_round_of_added_listeners_never_closes_the_sockets_of_the_fork() -> None:
    """A worker still starting may read a reload's round before it took its own sockets: the
    round closes only an earlier round's leftovers, never what the worker inherited at fork."""
    from l4lb.balancer import workers

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    forked, left, added = socket.socket(), socket.socket(), socket.socket()
    saved = (workers._CHANNEL, dict(workers._INHERITED), set(workers._RECEIVED))
    try:
        theirs.setblocking(False)
        workers._CHANNEL = theirs
        workers._INHERITED.clear()
        workers._INHERITED[("127.0.0.1", 1)] = forked  # from the fork, not taken yet
        ours.send(b"round")
        socket.send_fds(ours, [b"127.0.0.1 2"], [left.fileno()])  # a round no reload used
        assert workers.inherited_socket(("127.0.0.1", 3)) is None
        ours.send(b"round")
        socket.send_fds(ours, [b"127.0.0.1 3"], [added.fileno()])
        got = workers.inherited_socket(("127.0.0.1", 3))
        assert got is not None and got.fileno() >= 0
        got.close()
        assert workers.inherited_socket(("127.0.0.1", 1)) is forked and forked.fileno() >= 0
        assert ("127.0.0.1", 2) not in workers._INHERITED  # the leftover was closed
    finally:
        workers._CHANNEL, inherited, received = saved
        workers._INHERITED.clear()
        workers._INHERITED.update(inherited)
        workers._RECEIVED.clear()
        workers._RECEIVED.update(received)
        for s in (ours, theirs, forked, left, added):
            s.close()


def test_post_reload_that_removes_a_listener_closes_the_supervisors_copies(tmp_path: Path) -> None:
    """``POST /reload`` reloads the workers directly: the supervisor must follow them."""
    from tests.observe.live import http

    ports = {"a": free_port(), "b": free_port()}
    admin = free_port()
    tail = f'\n[admin]\nbind = "127.0.0.1:{admin}"\n'
    with backend(hello) as be, l4lb(tmp_path, config(be, ports) + tail) as lb:
        assert wait_for(lambda: lb.log_text().count("event=started") == 2, 20)
        assert wait_for(lambda: "event=admin_listening" in lb.log_text(), 20)

        def post_reload(listeners: dict[str, int]) -> None:
            before = lb.log_text().count("event=reloaded")
            lb.write_config(config(be, listeners) + tail)
            code, body = http(f"http://127.0.0.1:{admin}/reload", "POST")
            assert code == 200, body
            assert wait_for(lambda: lb.log_text().count("event=reloaded") >= before + 2, 20)

        post_reload({"a": ports["a"]})
        assert wait_for(lambda: refused(ports["b"]), 20), lb.log_text()
        post_reload(ports)  # added back by the workers themselves
        assert all_served(ports["b"]), lb.log_text()
        reload(lb, config(be, ports) + tail)  # a SIGHUP after it opens no second group
        assert all_served(ports["b"]), lb.log_text()
        reload(lb, config(be, {"a": ports["a"]}) + tail)
        assert wait_for(lambda: refused(ports["b"]), 20), lb.log_text()
        assert all_served(ports["a"])
