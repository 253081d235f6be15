"""The syslog output's parts: targets as the config writes them, the RFC 5424 message, the cut
of a long one, and the sender on real sockets (a collector down, back, closing, not reading)."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import pytest

from l4lb.observe import access_log, syslog
from l4lb.observe.syslog import Link, Sender, Severity, Target, Transport
from tests.support.peers import free_port, wait_for
from tests.support.syslog_receiver import SyslogReceiver, parse

TARGETS = [
    ("syslog:/dev/log", Target(Transport.UNIX, path="/dev/log")),
    (
        "syslog:/run/systemd/journal/syslog",
        Target(Transport.UNIX, path="/run/systemd/journal/syslog"),
    ),
    ("syslog+udp://127.0.0.1:514", Target(Transport.UDP, host="127.0.0.1", port=514)),
    ("syslog+udp://192.0.2.10", Target(Transport.UDP, host="192.0.2.10", port=514)),
    ("syslog+tcp://[2001:db8::1]:601", Target(Transport.TCP, host="2001:db8::1", port=601)),
    ("syslog+tcp://[2001:db8::1]", Target(Transport.TCP, host="2001:db8::1", port=601)),
    ("syslog+tcp://198.51.100.3:6514", Target(Transport.TCP, host="198.51.100.3", port=6514)),
]


@pytest.mark.parametrize(("text", "target"), TARGETS)
def test_targets_parse_and_print_back(text: str, target: Target) -> None:
    assert syslog.is_target(text)
    assert syslog.parse_target(text) == target
    assert syslog.parse_target(str(target)) == target


WRONG = [
    ("syslog", "'syslog:/dev/log'"),
    ("syslog:dev/log", "'syslog:/dev/log'"),
    ("syslog:127.0.0.1:514", "'syslog+udp://127.0.0.1:514'"),
    ("syslog://127.0.0.1:514", "'syslog+udp://127.0.0.1:514'"),
    ("udp://127.0.0.1:514", "'syslog+udp://127.0.0.1:514'"),
    ("tcp://127.0.0.1:601", "'syslog+tcp://127.0.0.1:601'"),
    ("syslog+udp:127.0.0.1:514", "'syslog+udp://IP:PORT'"),
    ("syslog+udp://localhost:514", "not an IP address"),
    ("syslog+udp://2001:db8::1:514", "'syslog+udp://[2001:db8::1]:514'"),
    ("syslog+tcp://[2001:db8::1:601", "'syslog+tcp://[2001:db8::1]:601'"),
    ("syslog+tcp://127.0.0.1:0", "1..65535"),
    ("syslog+tcp://127.0.0.1:http", "1..65535"),
    ("syslog:/" + "x" * 120, "at most 107 bytes"),
]


@pytest.mark.parametrize(("text", "shows"), WRONG)
def test_a_wrong_target_says_the_right_form(text: str, shows: str) -> None:
    assert syslog.is_target(text)
    with pytest.raises(ValueError, match="invalid syslog target") as err:
        syslog.parse_target(text)
    assert shows in str(err.value)


@pytest.mark.parametrize("text", ["stdout", "access.log", "/var/log/l4lb/syslog.json", "syslogs"])
def test_files_are_not_syslog_targets(text: str) -> None:
    assert not syslog.is_target(text)


def test_a_message_is_rfc5424_with_every_header_field() -> None:
    header = syslog.Header.here("local3", "edge lb")  # the space is not PRINTUSASCII
    when = 1_780_000_000.123456
    data = syslog.message(
        header.render(Severity.WARNING, when, "access"), b'{"a":"\xc3\xa9"}', 2048
    )
    msg = parse(data)
    assert (msg.facility, msg.severity, msg.version) == (19, 4, 1)
    assert data.startswith(b"<156>1 ")  # 19 * 8 + 4
    assert msg.timestamp.timestamp() == pytest.approx(when, abs=1e-6)
    assert "." in msg.timestamp_text and msg.timestamp.utcoffset() is not None
    assert msg.hostname == socket.gethostname()
    assert (msg.app_name, msg.procid, msg.msgid, msg.sd) == (
        "edgelb",
        str(os.getpid()),
        "access",
        "-",
    )
    assert msg.json() == {"a": "é"}


def test_a_long_message_is_cut_at_its_end_never_inside_a_character() -> None:
    head = syslog.Header.here("local0", "l4lb").render(Severity.INFO, time.time(), "access")
    body = "é".encode() * 5000  # two bytes each: a cut at an odd offset would halve one
    for limit in (2048, 2049, 8192):
        data = syslog.message(head, body, limit)
        assert len(data) <= limit and len(data) >= limit - 1
        assert data.startswith(head)
        parse(data)  # valid UTF-8: no half character


def test_an_access_line_too_long_for_udp_keeps_valid_json_with_truncated() -> None:
    encode = __import__("msgspec").json.Encoder().encode
    record = {"event": "connection", "client": "127.0.0.7:4000", "detail": "x" * 5000}
    line = access_log._fit(record, encode, 1800, b"")
    assert len(line) <= 1800
    assert b'"truncated":true' in line and b'"client":"127.0.0.7:4000"' in line


def test_octet_counting_frames() -> None:
    assert syslog.frame(b"<134>1 - - - - - -", Transport.TCP, True) == b"18 <134>1 - - - - - -"
    assert syslog.frame(b"abc", Transport.UNIX, True) == b"abc\0"
    assert syslog.frame(b"abc", Transport.UDP, False) == b"abc"


@pytest.mark.parametrize(
    ("record", "severity"),
    [
        ({"event": "connection", "end": "client_closed"}, Severity.INFO),
        ({"event": "connection", "end": "reset"}, Severity.INFO),
        ({"event": "connection", "end": "no_backend"}, Severity.WARNING),
        ({"event": "connection", "end": "connect_failed"}, Severity.WARNING),
        ({"event": "rejected", "reason": "denied"}, Severity.WARNING),
    ],
)
def test_severity_follows_the_record(record: dict[str, str], severity: Severity) -> None:
    assert access_log.severity(record) is severity


# -- the sender, on real sockets ------------------------------------------------------------


class Clock:
    """A clock the test moves: the backoff passes without a sleep."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Reports:
    def __init__(self) -> None:
        self.lines: list[tuple[int, str]] = []

    def __call__(self, level: int, message: str) -> None:
        self.lines.append((level, message))

    def events(self, name: str) -> list[str]:
        return [m for _, m in self.lines if f"event={name} " in m]


def _msg(n: int) -> bytes:
    head = syslog.Header.here("local0", "l4lb").render(Severity.INFO, time.time(), "access")
    return syslog.message(head, b'{"n":%d}' % n, 2048)


def test_udp_collector_down_then_up(tmp_path: Path) -> None:
    port = free_port()
    target = syslog.parse_target(f"syslog+udp://127.0.0.1:{port}")
    clock, reports = Clock(), Reports()
    sender = Sender(target, reports, clock=clock)
    assert sender.connect()  # UDP: nothing to refuse yet
    # the refusal (ICMP) of one datagram shows on a later send: send until one is refused
    assert wait_for(lambda: not sender.send(_msg(0)), 10, interval=0.01)
    assert sender.state is Link.DOWN
    assert len(reports.events("syslog_unreachable")) == 1
    assert reports.lines[0][0] == logging.WARNING
    with SyslogReceiver.udp(port=port) as rx:
        clock.now += syslog.BACKOFF_MAX
        assert wait_for(lambda: sender.send(_msg(100)) and sender.state is Link.UP, 10)
        assert sender.send(_msg(101))
        assert wait_for(lambda: [m.json()["n"] for m in rx.messages][-1:] == [101], 10)
        assert not rx.errors and all(m.json()["n"] in (100, 101) for m in rx.messages)
    assert len(reports.events("syslog_unreachable")) == 1
    assert len(reports.events("syslog_reachable")) == 1
    sender.close()


def test_unix_socket_missing_then_present(tmp_path: Path) -> None:
    path = tmp_path / "log.sock"
    clock, reports = Clock(), Reports()
    sender = Sender(syslog.parse_target(f"syslog:{path}"), reports, clock=clock)
    assert not sender.connect()
    assert not sender.send(_msg(1))
    [warning] = reports.events("syslog_unreachable")
    assert "No such file or directory" in warning and str(path) in warning
    with SyslogReceiver.unix_dgram(path) as rx:
        assert not sender.send(_msg(2))  # still within the backoff: dropped, not waited for
        clock.now += syslog.BACKOFF_MAX
        assert sender.send(_msg(3))
        assert [m.json()["n"] for m in rx.wait(1)] == [3]
    assert len(reports.events("syslog_unreachable")) == 1
    assert (
        reports.events("syslog_reachable") and "dropped=2" in reports.events("syslog_reachable")[0]
    )


def test_a_stream_unix_socket_gets_nul_ended_messages(tmp_path: Path) -> None:
    path = tmp_path / "stream.sock"
    with SyslogReceiver.unix_stream(path) as rx:
        sender = Sender(syslog.parse_target(f"syslog:{path}"), Reports())
        assert all(sender.send(_msg(n)) for n in range(3))
        assert sender.stream
        assert [m.json()["n"] for m in rx.wait(3)] == [0, 1, 2] and not rx.errors
        sender.close()


def test_tcp_collector_closing_the_connection_is_reconnected_at_once(tmp_path: Path) -> None:
    reports = Reports()
    with SyslogReceiver.tcp() as rx:
        sender = Sender(syslog.parse_target(rx.target), reports)
        assert sender.send(_msg(1))
        rx.wait(1)
        rx.drop_connections()  # the collector restarts: its end of the connection closes
        assert wait_for(lambda: sender.send(_msg(2)) and rx.connections == 2, 10)
        got = rx.wait(2)
        assert got[0].json()["n"] == 1 and got[-1].json()["n"] == 2 and not rx.errors
        sender.close()
    assert not reports.events("syslog_unreachable")


def test_tcp_collector_gone_is_retried_with_backoff() -> None:
    clock, reports = Clock(), Reports()
    rx = SyslogReceiver.tcp()
    port = rx.sock.getsockname()[1]
    sender = Sender(syslog.parse_target(rx.target), reports, clock=clock)
    assert sender.send(_msg(1))
    rx.close()  # killed: listener and connection gone
    assert wait_for(lambda: not sender.send(_msg(2)), 10)
    assert sender.state is Link.DOWN
    assert not sender.send(_msg(3))  # refused connects are not retried per line
    with SyslogReceiver.tcp(port=port) as back:
        clock.now += syslog.BACKOFF_MAX
        assert sender.send(_msg(4))
        assert back.wait(1)[0].json()["n"] == 4 and not back.errors
    assert len(reports.events("syslog_unreachable")) == 1
    sender.close()


def test_a_collector_that_does_not_read_never_blocks_the_access_log() -> None:
    """A TCP collector that accepts and never reads: the writer thread blocks on it (up to
    SEND_TIMEOUT), the bounded queue fills, and write() drops and counts instead of waiting."""
    with socket.socket() as stalled:
        stalled.bind(("127.0.0.1", 0))
        stalled.listen(1)
        port = stalled.getsockname()[1]
        before = access_log.dropped()
        log = access_log.AccessLog(f"syslog+tcp://127.0.0.1:{port}", max_queued=50)
        try:
            record = {"event": "connection", "detail": "x" * 200}
            for _ in range(50_000):  # far more than the socket buffers hold
                log.write(dict(record))
                if access_log.dropped() - before > 1000:
                    break
            assert access_log.dropped() - before > 1000
        finally:
            log.close(wait=False)


def test_access_log_over_udp_cuts_a_long_line_into_one_message() -> None:
    """Through the AccessLog's writer to a real UDP socket: a line over 2048 bytes has its
    strings cut (valid JSON, "truncated": true); one still too long has its end cut; each
    is one datagram of at most 2048 bytes, never two."""
    with SyslogReceiver.udp() as rx:
        log = access_log.AccessLog(rx.target, facility="local1", tag="t")
        try:
            log.write({"event": "connection", "client": "127.0.0.7:1", "detail": "é" * 3000})
            many = {f"k{n}": "x" * 300 for n in range(12)}  # 12 * 256 after the cut: too long
            log.write({"event": "connection", "client": "127.0.0.7:2", **many})
            got = rx.wait(2)
        finally:
            log.close()
    assert len(got) == 2 and not rx.errors and len(rx.raw) == 2
    assert all(len(raw) <= 2048 for raw in rx.raw)
    first = got[0].json()
    assert first["truncated"] is True and first["detail"] == "é" * 256
    assert (got[0].facility, got[0].severity, got[0].app_name) == (17, 6, "t")
    assert len(rx.raw[1]) == 2048
    assert got[1].msg.startswith(b'{"event":"connection","client":"127.0.0.7:2"')


def test_a_batch_over_tcp_is_one_write_of_whole_frames() -> None:
    with SyslogReceiver.tcp() as rx:
        sender = Sender(syslog.parse_target(rx.target), Reports())
        assert sender.send_many([_msg(n) for n in range(500)]) == 500
        assert len(rx.wait(500)) == 500  # accepted and read: its connection is the one to drop
        rx.drop_connections()  # the collector restarts between two batches
        assert wait_for(lambda: sender.send_many([_msg(1000)]) == 1 and rx.connections == 2, 10)
        got = rx.wait(501)
        assert [m.json()["n"] for m in got[:500]] == list(range(500)) and not rx.errors
        assert got[-1].json()["n"] == 1000
        sender.close()
