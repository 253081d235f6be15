"""``relay = "kernel"`` in a real ``l4lb run``: timeouts and counters when the bytes bypass the
process, the start-up self-test's fallback without capabilities, and ``l4lb check``'s note.

The relay suite itself (byte-exact, half-close, resets, slow readers, graceful stop, reload) runs
with ``"kernel"`` through ``RELAY_MODES``; these are the points only this relay has.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.balancer.helpers import backend, connect, echo, recv_all
from tests.balancer.kernel_support import needs_kernel_path, sockets_in_the_map
from tests.support.l4lb import config_text, l4lb
from tests.support.peers import free_port, stop_process, wait_for


def cfg(port: int, backends: list[str], **pool: object) -> str:
    return config_text(f"127.0.0.1:{port}", backends, top={"relay": "kernel"}, pool=pool)


@needs_kernel_path
def test_traffic_through_the_kernel_keeps_the_idle_timeout_away(tmp_path: Path) -> None:
    """After its third exchange the process sees none of these bytes (they go through the
    kernel): the idle sweep must read the program's counts."""
    port = free_port()
    with (
        backend(echo) as be,
        l4lb(tmp_path, cfg(port, [be.address], idle_timeout="1s")) as lb,
    ):
        client = connect(port)
        sent = 0
        deadline = time.monotonic() + 3.5  # over three idle timeouts of steady small traffic
        while time.monotonic() < deadline:
            client.sendall(b"ping\n")
            assert recv_all(client, 5) == b"ping\n"  # still open: an echo each time
            sent += 5
            time.sleep(0.2)
        assert "kernel_relay_unavailable" not in lb.log_text()
        assert client.recv(1) == b""  # now silent: closed at the idle timeout
        (line,) = lb.wait_access(1)
        assert line["end"] == "idle_timeout"
        assert (line["bytes_from_client"], line["bytes_to_client"]) == (sent, sent)


@needs_kernel_path
def test_only_a_connection_that_proved_long_lived_enters_the_kernel(tmp_path: Path) -> None:
    """Seen from outside: the worker's cookie -> slot map holds the sockets handed over."""
    port = free_port()
    with backend(echo) as be, l4lb(tmp_path, cfg(port, [be.address])) as lb:
        short = connect(port)
        short.sendall(b"one request\n")
        assert recv_all(short, 12) == b"one request\n"
        long = connect(port)
        for i in range(3):  # the client speaks again after an answer twice
            long.sendall(b"req%d\n" % i)
            assert recv_all(long, 5) == b"req%d\n" % i
        assert "kernel_relay_unavailable" not in lb.log_text()
        assert sockets_in_the_map(lb.pid) == 0
        long.sendall(b"req3\n")  # the third time: handed over, both of its sockets
        assert recv_all(long, 5) == b"req3\n"
        assert wait_for(lambda: sockets_in_the_map(lb.pid) == 2)
        for i in range(4, 8):
            long.sendall(b"req%d\n" % i)
            assert recv_all(long, 5) == b"req%d\n" % i
        for c in (short, long):
            c.shutdown(1)
            assert c.recv(1) == b""
            c.close()
        lines = lb.wait_access(2)
        assert sorted((ln["bytes_from_client"], ln["bytes_to_client"]) for ln in lines) == [
            (12, 12),
            (40, 40),
        ]
        assert wait_for(lambda: sockets_in_the_map(lb.pid) == 0)


@needs_kernel_path
def test_the_kernel_table_sets_the_hand_over_and_a_reload_changes_it(tmp_path: Path) -> None:
    """``[kernel] handover_exchanges = 0``: a connection enters the kernel right after its
    header; a reload to thresholds never reached keeps new connections on splice, and the
    connection already in the kernel stays there."""
    port = free_port()

    def text(**kernel: object) -> str:
        top = {"relay": "kernel", "kernel": kernel}
        return config_text(f"127.0.0.1:{port}", [be.address], top=top)

    with backend(echo) as be, l4lb(tmp_path, text(handover_exchanges=0)) as lb:
        first = connect(port)
        first.sendall(b"at once\n")
        assert recv_all(first, 8) == b"at once\n"
        assert wait_for(lambda: sockets_in_the_map(lb.pid) == 2)
        lb.reload(text(handover_exchanges=1000, handover_after="1h"))
        lb.wait_log("event=reloaded")
        second = connect(port)
        for i in range(6):  # more exchanges than the default hands over after
            second.sendall(b"req%d\n" % i)
            assert recv_all(second, 5) == b"req%d\n" % i
        first.sendall(b"still\n")
        assert recv_all(first, 6) == b"still\n"
        assert sockets_in_the_map(lb.pid) == 2  # the first one's pair only
        for c in (first, second):
            c.shutdown(1)
            assert c.recv(1) == b""
            c.close()
        lines = lb.wait_access(2)
        assert sorted((ln["bytes_from_client"], ln["bytes_to_client"]) for ln in lines) == [
            (14, 14),
            (30, 30),
        ]


@needs_kernel_path
def test_a_client_that_only_listens_meets_the_client_timeout(tmp_path: Path) -> None:
    def streamer(sock: object, header: object, early: bytes) -> None:
        import socket as s

        assert isinstance(sock, s.socket)
        try:
            while True:
                sock.sendall(b"tick\n")
                time.sleep(0.1)
        except OSError:
            pass

    port = free_port()
    with (
        backend(streamer) as be,
        l4lb(tmp_path, cfg(port, [be.address], client_timeout="1s")) as lb,
    ):
        client = connect(port)
        client.sendall(b"subscribe\n")
        got = recv_all(client)  # ticks until the balancer closes it
        assert got.startswith(b"tick\n")
        (line,) = lb.wait_access(1)
        assert line["end"] == "client_timeout"
        assert line["bytes_from_client"] == 10
        assert line["bytes_to_client"] >= len(got)


def test_without_capabilities_it_says_so_once_and_relays_with_the_default(
    tmp_path: Path,
) -> None:
    """Run unprivileged (every capability dropped with setpriv): one clear line, then splice."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop capabilities from (an unprivileged run is the same case)")
    port = free_port()
    with backend(echo) as be:
        path = tmp_path / "l4lb.toml"
        path.write_text(cfg(port, [be.address]))
        log = tmp_path / "l4lb.log"
        proc = subprocess.Popen(
            ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--",
             sys.executable, "-m", "l4lb", "run", "--config", str(path)],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=open(log, "wb"),  # noqa: SIM115
        )  # fmt: skip
        try:
            assert wait_for(lambda: "event=started" in log.read_text(), timeout=20), log.read_text()
            client = connect(port)
            client.sendall(b"hello\n")
            assert recv_all(client, 6) == b"hello\n"
            client.close()
            lines = [ln for ln in log.read_text().splitlines() if "kernel_relay" in ln]
            assert len(lines) == 1, lines
            assert "event=kernel_relay_unavailable" in lines[0]
            assert "CAP_BPF and CAP_NET_ADMIN" in lines[0]
        finally:
            stop_process(proc)


def test_check_says_what_the_kernel_relay_needs(tmp_path: Path) -> None:
    path = tmp_path / "l4lb.toml"
    path.write_text(cfg(free_port(), ["127.0.0.1:9"]))
    result = subprocess.run(
        [sys.executable, "-m", "l4lb", "check", str(path)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "note: relay: " in result.stderr
    assert "Linux >= 5.13" in result.stderr and "CAP_BPF + CAP_NET_ADMIN" in result.stderr


def _bpf_descriptors(pid: int) -> list[str]:
    """The bpf maps and programs a process holds (``anon_inode:bpf-map``, ``bpf-prog``)."""
    fds = Path(f"/proc/{pid}/fd")
    out = []
    for fd in fds.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if "bpf-" in target:
            out.append(target)
    return out


@needs_kernel_path
def test_a_reload_switches_the_relay_and_live_connections_keep_theirs(tmp_path: Path) -> None:
    port = free_port()
    with backend(echo) as be:
        splice_cfg = config_text(f"127.0.0.1:{port}", [be.address], top={"relay": "splice"})
        with l4lb(tmp_path, splice_cfg) as lb:
            by_splice = connect(port)
            by_splice.sendall(b"one\n")
            assert recv_all(by_splice, 4) == b"one\n"
            assert _bpf_descriptors(lb.pid) == []
            lb.reload(cfg(port, [be.address]))
            assert "event=reloaded" in lb.log_text()
            assert "kernel_relay_unavailable" not in lb.log_text()
            # the reload loaded the program and self-tested it
            assert any("bpf-prog" in d for d in _bpf_descriptors(lb.pid))
            by_kernel = connect(port)
            for i in range(4):  # the fourth exchange hands it to the kernel (Handover)
                by_kernel.sendall(b"two%d\n" % i)
                assert recv_all(by_kernel, 5) == b"two%d\n" % i
            by_splice.sendall(b"still splice\n")
            assert recv_all(by_splice, 13) == b"still splice\n"
            lb.reload(splice_cfg)
            by_kernel.sendall(b"still kernel\n")  # its pair stays in the map after the reload
            assert recv_all(by_kernel, 13) == b"still kernel\n"
            for c in (by_splice, by_kernel):
                c.shutdown(1)
                assert c.recv(1) == b""
                c.close()
            lines = lb.wait_access(2)
            assert sorted((ln["bytes_from_client"], ln["bytes_to_client"]) for ln in lines) == [
                (17, 17),
                (33, 33),
            ]
