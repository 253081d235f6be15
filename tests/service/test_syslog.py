"""The access log over syslog, end to end: a real ``l4lb run`` sends RFC 5424 messages to a
socket the test reads (unix datagram, UDP, TCP), and to a real rsyslogd; a collector down at
the start, killed mid-stream, reconnected by SIGUSR2 and reload; every worker its own PROCID."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.support.echo_backend import EchoBackend
from tests.support.l4lb import L4lb, config_text, start_l4lb
from tests.support.peers import connect_from, free_port, stop_process, wait_for, wait_port
from tests.support.rsyslog import RSYSLOGD, Rsyslog
from tests.support.syslog_receiver import Rfc5424, SyslogReceiver

CLIENT = "127.0.0.7"
LOCAL3 = 19
INFO, WARNING = 6, 4


def _config(port: int, backend: str, target: str, **log: Any) -> str:
    text = config_text(f"127.0.0.1:{port}", [backend], access_log=target)
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in log.items())
    return text.replace("[log]\n", "[log]\n" + extra, 1)


def _one_connection(port: int, payload: bytes = b"hello\n") -> None:
    with connect_from(CLIENT, "127.0.0.1", port, timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):
            pass


def _refused(port: int) -> None:
    """A client the balancer resets or closes without an answer (the reset may even come
    before connect() returns: Python's connect with a timeout then reads it from SO_ERROR)."""
    with contextlib.suppress(OSError), connect_from(CLIENT, "127.0.0.1", port, timeout=10) as sock:
        sock.sendall(b"x")
        while sock.recv(4096):
            pass


def _receiver(kind: str, tmp_path: Path) -> SyslogReceiver:
    if kind == "unix":
        return SyslogReceiver.unix_dgram(tmp_path / "log.sock")
    if kind == "udp":
        return SyslogReceiver.udp()
    return SyslogReceiver.tcp()


def _check_header(msg: Rfc5424, lb: L4lb, severity: int = INFO) -> dict[str, Any]:
    """The header fields l4lb promises, and the JSON body: the access record."""
    assert (msg.facility, msg.severity, msg.version) == (LOCAL3, severity, 1)
    assert msg.facility * 8 + msg.severity == LOCAL3 * 8 + severity
    assert "." in msg.timestamp_text  # fractional seconds
    assert abs(msg.timestamp - datetime.now(UTC)) < timedelta(minutes=5)
    assert msg.hostname == socket.gethostname()
    assert (msg.app_name, msg.msgid, msg.sd) == ("edge-lb", "access", "-")
    assert msg.procid == str(lb.pid)
    record: dict[str, Any] = msg.json()
    return record


@pytest.mark.parametrize("kind", ["unix", "udp", "tcp"])
def test_access_lines_reach_a_collector_as_rfc5424(tmp_path: Path, kind: str) -> None:
    port = free_port()
    with _receiver(kind, tmp_path) as rx, EchoBackend("echo") as backend:
        text = _config(port, backend.address, rx.target, facility="local3", tag="edge-lb")
        lb = start_l4lb(tmp_path / "lb", text)
        try:
            _one_connection(port, b"one\n")
            _one_connection(port, b"two, longer\n")
            got = rx.wait(2)
            assert len(got) == 2 and not rx.errors, (rx.raw, rx.errors, lb.log_text())
            for msg, sent in zip(got, (b"one\n", b"two, longer\n"), strict=True):
                record = _check_header(msg, lb)
                assert record["event"] == "connection"
                assert record["client"].startswith(f"{CLIENT}:")
                assert record["backend"] == backend.address
                assert record["bytes_from_client"] == len(sent)
                assert record["end"] == "client_closed"
            assert not (tmp_path / "lb" / "syslog:").exists()  # not taken for a file name
        finally:
            stop_process(lb.proc)
    assert "event=syslog_unreachable" not in lb.log_text()
    assert "Traceback" not in lb.log_text()


def test_rejections_and_failures_are_warnings(tmp_path: Path) -> None:
    port = free_port()
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    with SyslogReceiver.udp() as rx:
        text = _config(port, dead, rx.target, facility="local3", tag="edge-lb")
        lb = start_l4lb(tmp_path / "lb", text)
        try:
            _refused(port)  # reset: no backend to take it
            [msg] = rx.wait(1)
            record = _check_header(msg, lb, severity=WARNING)
            assert record["end"] in ("connect_failed", "no_backend"), record
            lb.reload(text.replace('pool = "main"', 'pool = "main"\nallow = ["127.0.0.1/32"]'))
            _refused(port)  # closed: 127.0.0.7 is not allowed
            got = rx.wait(2)
            assert len(got) == 2 and not rx.errors, (rx.raw, lb.log_text())
            record = _check_header(got[1], lb, severity=WARNING)
            assert record["event"] == "rejected" and record["peer"].startswith(CLIENT)
        finally:
            stop_process(lb.proc)


def _keep_connecting(port: int, until: Any, timeout: float = 30.0) -> bool:
    """One client connection after another until ``until()``: lines while the collector is
    away are dropped, so only a line sent after it is back can arrive."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _one_connection(port)
        if wait_for(until, 0.3):
            return True
    return False


@pytest.mark.parametrize("kind", ["tcp", "udp", "unix"])
def test_collector_down_at_start_then_up(tmp_path: Path, kind: str) -> None:
    port = free_port()
    later = free_port()
    path = tmp_path / "log.sock"
    target = {
        "tcp": f"syslog+tcp://127.0.0.1:{later}",
        "udp": f"syslog+udp://127.0.0.1:{later}",
        "unix": f"syslog:{path}",
    }[kind]
    with EchoBackend("echo") as backend:
        text = _config(port, backend.address, target, facility="local3", tag="edge-lb")
        lb = start_l4lb(tmp_path / "lb", text)
        try:
            if kind != "udp":  # a UDP "connect" sends nothing: the first refusal comes later
                assert wait_for(lambda: "event=syslog_unreachable" in lb.log_text(), 10)
            # lines while it is down are dropped (UDP: one is refused only on a later send)
            assert _keep_connecting(port, lambda: "event=syslog_unreachable" in lb.log_text())
            assert lb.proc.poll() is None
            if kind == "tcp":
                rx = SyslogReceiver.tcp(port=later)
            elif kind == "udp":
                rx = SyslogReceiver.udp(port=later)
            else:
                rx = SyslogReceiver.unix_dgram(path)
            with rx:
                assert _keep_connecting(port, lambda: len(rx.messages) >= 1), lb.log_text()
                _one_connection(port)
                got = rx.wait(2)
                assert not rx.errors
                assert all(_check_header(m, lb)["client"].startswith(CLIENT) for m in got)
                assert wait_for(lambda: "event=access_log_dropped" in lb.log_text(), 10)
        finally:
            stop_process(lb.proc)
    log = lb.log_text()
    assert log.count("event=syslog_unreachable") == 1, log
    assert "event=syslog_reachable" in log, log
    assert "Traceback" not in log


def test_tcp_collector_killed_mid_stream_is_reconnected(tmp_path: Path) -> None:
    port = free_port()
    with EchoBackend("echo") as backend:
        rx = SyslogReceiver.tcp()
        collector = rx.sock.getsockname()[1]
        text = _config(port, backend.address, rx.target, facility="local3", tag="edge-lb")
        lb = start_l4lb(tmp_path / "lb", text)
        try:
            for _ in range(3):
                _one_connection(port)
            assert len(rx.wait(3)) == 3
            rx.close()  # killed: listener and connection gone
            for _ in range(3):
                _one_connection(port)  # these find no collector: dropped, counted
            with SyslogReceiver.tcp(port=collector) as back:
                assert _keep_connecting(port, lambda: len(back.messages) >= 1), lb.log_text()
                _one_connection(port)
                got = back.wait(2)
                assert not back.errors and not rx.errors
                for msg in got:
                    assert _check_header(msg, lb)["client"].startswith(CLIENT)
            assert lb.proc.poll() is None
        finally:
            stop_process(lb.proc)
    assert "Traceback" not in lb.log_text()


def test_sigusr2_and_reload_reconnect(tmp_path: Path) -> None:
    port = free_port()
    with SyslogReceiver.tcp() as rx, EchoBackend("echo") as backend:
        text = _config(port, backend.address, rx.target, facility="local3", tag="edge-lb")
        events = text.replace("[log]\n", f'[log]\nevents = "{rx.target}"\n')
        lb = start_l4lb(tmp_path / "lb", text)
        try:
            assert wait_for(lambda: rx.connections == 1, 10)
            _one_connection(port)
            rx.wait(1)
            lb.proc.send_signal(signal.SIGUSR2)
            assert wait_for(lambda: rx.connections == 2, 10), lb.log_text()
            _one_connection(port)
            assert len(rx.wait(2)) == 2
            lb.reload()
            assert wait_for(lambda: rx.connections == 3, 10), lb.log_text()
            _one_connection(port)
            got = rx.wait(3)
            assert len(got) == 3 and not rx.errors
            assert all(_check_header(m, lb)["event"] == "connection" for m in got)
            lb.reload(events)  # the event lines too: one more connection
            assert wait_for(lambda: rx.connections == 5, 10), lb.log_text()
            lb.proc.send_signal(signal.SIGUSR2)  # both reconnect
            assert wait_for(lambda: rx.connections == 7, 10), lb.log_text()
            assert wait_for(lambda: _events(rx, "access_log_reopened"), 10), rx.raw
        finally:
            stop_process(lb.proc)
    assert "event=access_log_reopened target=syslog+tcp://" in lb.log_text()


def _children(pid: int) -> set[str]:
    return set(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())


def test_each_worker_sends_with_its_own_procid(tmp_path: Path) -> None:
    port = free_port()
    with SyslogReceiver.unix_dgram(tmp_path / "log.sock") as rx, EchoBackend("echo") as backend:
        text = _config(port, backend.address, rx.target, facility="local3", tag="edge-lb")
        text = text.replace("workers = 1", "workers = 2")
        lb = start_l4lb(tmp_path / "lb", text)
        try:
            assert wait_for(lambda: lb.log_text().count("event=started") == 2, 20)
            workers = _children(lb.pid)
            assert len(workers) == 2
            # the kernel steers a client address to one worker: several source addresses
            for n in range(24):
                with connect_from(f"127.0.0.{10 + n}", "127.0.0.1", port, timeout=10) as sock:
                    sock.sendall(b"hi\n")
                    sock.shutdown(socket.SHUT_WR)
                    while sock.recv(4096):
                        pass
            got = rx.wait(24)
            assert len(got) == 24 and not rx.errors
            by_worker: dict[int, set[str]] = {}
            for msg in got:
                by_worker.setdefault(msg.json()["worker"], set()).add(msg.procid)
            assert set(by_worker) == {0, 1}, by_worker
            assert all(len(p) == 1 for p in by_worker.values()), by_worker
            assert by_worker[0] | by_worker[1] == workers  # the workers' pids, not the supervisor's
        finally:
            stop_process(lb.proc)


# -- a real rsyslogd --------------------------------------------------------------------------


@pytest.fixture
def rsyslog(tmp_path: Path) -> Any:
    if not Path(RSYSLOGD).exists():
        pytest.fail("rsyslog is not installed: make sysdeps installs it")
    with Rsyslog(tmp_path / "rsyslog", tag="edge-lb") as server:
        yield server


@pytest.mark.parametrize("kind", ["unix", "udp", "tcp"])
def test_rsyslog_receives_and_parses_the_access_log(
    tmp_path: Path, rsyslog: Rsyslog, kind: str
) -> None:
    port = free_port()
    with EchoBackend("echo") as backend:
        target = rsyslog.targets[kind]
        text = _config(port, backend.address, target, facility="local3", tag="edge-lb")
        lb = start_l4lb(tmp_path / "lb", text)
        try:
            _one_connection(port)
            assert wait_for(lambda: len(rsyslog.messages()) >= 1, 15), rsyslog.output()
        finally:
            stop_process(lb.proc)
    [got] = rsyslog.messages()
    assert (got["facility"], got["severity"]) == (LOCAL3, INFO)
    assert (got["app_name"], got["procid"], got["msgid"]) == ("edge-lb", str(lb.pid), "access")
    assert got["hostname"] == socket.gethostname()
    assert got["input"] == {"unix": "imuxsock", "udp": "imudp", "tcp": "imtcp"}[kind]
    assert "." in got["timestamp"]  # rsyslog kept the fractional seconds it parsed
    record = json.loads(got["msg"])
    assert record["event"] == "connection" and record["client"].startswith(f"{CLIENT}:")
    assert wait_for(lambda: rsyslog.access_lines() == [record], 10), rsyslog.access_lines()
    assert "event=syslog_unreachable" not in lb.log_text()


def test_rsyslog_killed_and_restarted_over_tcp(tmp_path: Path, rsyslog: Rsyslog) -> None:
    port = free_port()
    with EchoBackend("echo") as backend:
        text = _config(
            port, backend.address, rsyslog.targets["tcp"], facility="local3", tag="edge-lb"
        )
        lb = start_l4lb(tmp_path / "lb", text)
        try:
            _one_connection(port)
            assert wait_for(lambda: len(rsyslog.messages()) == 1, 15), rsyslog.output()
            rsyslog.kill()
            _one_connection(port)
            rsyslog.start()
            assert _keep_connecting(port, lambda: len(rsyslog.messages()) >= 2), lb.log_text()
        finally:
            stop_process(lb.proc)
    messages = rsyslog.messages()
    assert all(m["procid"] == str(lb.pid) and m["app_name"] == "edge-lb" for m in messages)
    assert all(json.loads(m["msg"])["client"].startswith(CLIENT) for m in messages)
    assert lb.proc.returncode == 0


# -- the event lines ([log] events) -------------------------------------------------------------


def _events(rx: SyslogReceiver, msgid: str) -> list[Rfc5424]:
    return [m for m in list(rx.messages) if m.msgid == msgid]


def test_event_lines_go_to_syslog_each_process_with_its_procid(tmp_path: Path) -> None:
    port = free_port()
    dead = f"127.0.0.1:{free_port()}"
    with SyslogReceiver.tcp() as rx:
        text = _config(port, dead, rx.target, facility="local3", tag="edge-lb", events=rx.target)
        text = text.replace("workers = 1", "workers = 2")
        lb = start_l4lb(tmp_path / "lb", text, wait=False)
        try:
            assert wait_for(lambda: _events(rx, "workers_started"), 20), (rx.raw, lb.log_text())
            _refused(port)
            assert wait_for(lambda: _events(rx, "connect_failed"), 10), rx.raw
            workers = _children(lb.pid)
        finally:
            lb.stop()
        assert wait_for(lambda: _events(rx, "workers_stopped"), 10), rx.raw
        assert not rx.errors
    [supervisor] = _events(rx, "workers_started")
    assert (supervisor.facility, supervisor.severity, supervisor.app_name) == (
        LOCAL3,
        INFO,
        "edge-lb",
    )
    assert supervisor.procid == str(lb.pid)
    assert b"level=info logger=l4lb.workers event=workers_started workers=2" in supervisor.msg
    started = _events(rx, "started")
    assert {m.procid for m in started} == workers and len(started) == 2
    failed = _events(rx, "connect_failed")[0]
    assert failed.severity == WARNING and failed.procid in workers
    assert f"client={CLIENT}:".encode() in failed.msg
    [access] = _events(rx, "access")
    assert access.json()["client"].startswith(CLIENT) and access.severity == WARNING
    assert "event=started" not in lb.log_text()  # they went to syslog, not to stderr
    assert lb.proc.returncode == 0


def test_event_lines_collector_down_is_said_on_stderr(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "events.sock"
    with EchoBackend("echo") as backend:
        text = _config(port, backend.address, "off", events=f"syslog:{path}")
        lb = start_l4lb(tmp_path / "lb", text, wait=False)
        try:
            unreachable = "event=syslog_unreachable log=events"
            assert wait_for(lambda: unreachable in lb.log_text(), 20), lb.log_text()
            wait_port("127.0.0.1", port, 20, lb.proc)  # access = "off": a probe logs nothing
            _one_connection(port)  # served: the loop runs, its signal handlers are in place
            with SyslogReceiver.unix_dgram(path) as rx:
                lb.proc.send_signal(signal.SIGUSR2)  # reconnects now, without the backoff
                lb.stop()
                assert wait_for(lambda: _events(rx, "stopped"), 10), (rx.raw, lb.log_text())
                assert not rx.errors and _events(rx, "stopping")[0].procid == str(lb.pid)
        finally:
            stop_process(lb.proc)
    log = lb.log_text()
    assert log.count("event=syslog_unreachable") == 1, log
    assert "event=syslog_reachable log=events" in log, log
    assert "event=started" not in log  # sent to the socket that was not there: dropped
    assert "Traceback" not in log and lb.proc.returncode == 0


# -- l4lb check ---------------------------------------------------------------------------------


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "l4lb", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_shows_the_right_syslog_form(tmp_path: Path) -> None:
    path = tmp_path / "l4lb.toml"
    text = config_text("127.0.0.1:8443", ["127.0.0.1:9001"], access_log="syslog://127.0.0.1:514")
    path.write_text(
        text.replace(
            "[log]\n",
            '[log]\nevents = "udp://[2001:db8::1]:514"\nfacility = "local8"\ntag = "l4 lb"\n',
        )
    )
    done = _check(path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    out = done.stderr
    assert "log.access: invalid syslog target 'syslog://127.0.0.1:514'" in out
    assert "such as 'syslog+udp://127.0.0.1:514'" in out
    assert "log.events: invalid syslog target" in out and "'syslog+udp://[2001:db8::1]:514'" in out
    assert "log.facility: invalid value 'local8'" in out and "'local7'" in out
    assert "log.tag: invalid value 'l4 lb': expected 1 to 48 visible ASCII characters" in out
    assert out.count("(line ") == 4


def test_check_accepts_the_forms_and_warns_of_a_missing_socket(tmp_path: Path) -> None:
    path = tmp_path / "l4lb.toml"
    missing = tmp_path / "no-daemon.sock"
    for target in ("syslog+udp://127.0.0.1", "syslog+tcp://[2001:db8::1]:601", f"syslog:{missing}"):
        path.write_text(config_text("127.0.0.1:8443", ["127.0.0.1:9001"], access_log=target))
        done = _check(path)
        assert done.returncode == 0, done.stderr
        assert ("warning: log.access: cannot reach" in done.stderr) == target.startswith("syslog:/")
    with SyslogReceiver.unix_dgram(missing):
        done = _check(path)
        assert done.returncode == 0 and "warning" not in done.stderr, done.stderr
