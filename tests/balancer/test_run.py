"""``l4lb run`` as a process: exit codes, PROXY header contents, TLS peeking, reload."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from l4lb.proxy_protocol import ProxyHeader, TLVType
from tests.balancer.helpers import backend, connect, echo, hello, recv_all
from tests.support.l4lb import config_text, l4lb, start_l4lb
from tests.support.peers import free_port, wait_for


def run(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "l4lb", "run", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_invalid_config_exits_1_listing_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        config_text("127.0.0.1:1", ["127.0.0.1:2"], pool={"balance": "rr"}, top={"workers": 0})
    )
    result = run(["--config", str(path)])
    assert result.returncode == 1
    assert "pools.main.balance: invalid value 'rr'" in result.stderr
    assert "workers: invalid value 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_usage_exits_2() -> None:
    assert run([]).returncode == 2
    assert run(["--bogus"]).returncode == 2


def test_bind_failure_exits_3(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "l4lb.toml"
        path.write_text(config_text(f"127.0.0.1:{port}", ["127.0.0.1:9"]))
        result = run(["--config", str(path)])
    assert result.returncode == 3
    assert f"cannot bind 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("send_proxy", "override", "version"),
    [("v1", None, 1), ("v2", None, 2), ("v2", "v1", 1), ("v1", "v2", 2), ("off", None, 0)],
)
def test_proxy_version_per_pool_and_backend(
    tmp_path: Path, send_proxy: str, override: str | None, version: int
) -> None:
    port = free_port()
    with backend(echo, proxy=version != 0) as be:
        entry: dict[str, object] = {"address": be.address}
        if override:
            entry["send_proxy"] = override
        text = config_text(f"127.0.0.1:{port}", [entry], pool={"send_proxy": send_proxy})
        with l4lb(tmp_path, text) as lb:
            client = connect(port, "127.0.0.9")
            client.sendall(b"data")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"data"
            cport = client.getsockname()[1]
            header = be.seen[0].header
            if version:
                assert header is not None and header.version == version
                assert header.source == ("127.0.0.9", cport)
                assert header.destination == ("127.0.0.1", port)
            (line,) = lb.wait_access(1)
            assert line["proxy"] == ("off", "v1", "v2")[version]


def test_header_tlvs_unique_id_crc32c_noop(tmp_path: Path) -> None:
    port = free_port()
    with backend(echo) as be:
        text = config_text(
            f"127.0.0.1:{port}",
            [be.address],
            pool={"proxy_tlvs": ["unique_id", "crc32c", "noop"]},
        )
        with l4lb(tmp_path, text) as lb:
            ids = set()
            for _ in range(3):
                client = connect(port)
                client.shutdown(socket.SHUT_WR)
                recv_all(client)
                client.close()
            for seen in be.seen:
                header = seen.header
                assert header is not None
                uid = header.tlv(TLVType.UNIQUE_ID)
                assert uid is not None
                ids.add(uid.decode())
                assert header.crc32c is not None  # verified by the parser
                assert header.tlv(TLVType.NOOP) == b""
            assert len(ids) == 3
            assert {line["unique_id"] for line in lb.wait_access(3)} == ids


def _tls_client(port: int, server_name: str, alpn: list[str]) -> None:
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=server_name):
                pass
        except (ssl.SSLError, OSError):
            pass  # the backend does not speak TLS; the ClientHello is what matters


def test_authority_and_alpn_from_the_client_hello(tmp_path: Path) -> None:
    hellos: list[bytes] = []

    def handler(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
        hellos.append(early + sock.recv(65536))

    port = free_port()
    with backend(handler) as be:
        text = config_text(
            f"127.0.0.1:{port}",
            [be.address],
            pool={"proxy_tlvs": ["authority", "alpn"], "tls_peek_timeout": "2s"},
        )
        with l4lb(tmp_path, text):
            _tls_client(port, "shop.example.test", ["h2", "http/1.1"])
            assert wait_for(lambda: bool(hellos))
            header = be.seen[0].header
            assert header is not None
            assert header.authority == "shop.example.test"
            assert header.alpn == b"h2"
            assert hellos[0][0] == 0x16  # the ClientHello itself went through untouched


def test_server_speaks_first_works_with_tls_peek(tmp_path: Path) -> None:
    def banner(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
        sock.sendall(b"220 smtp.example.test ESMTP\r\n")
        echo(sock, header, early)

    port = free_port()
    with backend(banner) as be:
        text = config_text(
            f"127.0.0.1:{port}",
            [be.address],
            pool={"proxy_tlvs": ["authority", "unique_id"], "tls_peek_timeout": "300ms"},
        )
        with l4lb(tmp_path, text):
            client = connect(port)
            start = time.monotonic()
            assert client.recv(100) == b"220 smtp.example.test ESMTP\r\n"
            assert time.monotonic() - start < 5
            client.sendall(b"EHLO me\r\n")
            assert client.recv(100) == b"EHLO me\r\n"
            header = be.seen[0].header
            assert header is not None and header.authority is None
            assert header.unique_id is not None


def test_reload_switches_pool_and_keeps_connections(tmp_path: Path) -> None:
    port = free_port()
    with backend(hello) as old, backend(hello) as new:
        text = config_text(f"127.0.0.1:{port}", [old.address])
        with l4lb(tmp_path, text) as lb:
            inflight = connect(port)
            assert inflight.recv(100).startswith(b"client=")
            lb.reload(config_text(f"127.0.0.1:{port}", [new.address]))
            assert "event=reloaded" in lb.log_text()
            fresh = connect(port)
            assert fresh.recv(100).startswith(b"client=")
            assert len(new.seen) == 1 and len(old.seen) == 1
            inflight.sendall(b"still here")  # the old connection is untouched
            assert inflight.recv(100) == b"still here"
            # an invalid config is refused; the running one stays
            lb.reload("this is [not toml")
            assert "event=reload_rejected" in lb.log_text()
            again = connect(port)
            assert again.recv(100).startswith(b"client=")
            assert len(new.seen) == 2
            for c in (inflight, fresh, again):
                c.close()


def test_reload_adds_and_removes_listeners(tmp_path: Path) -> None:
    port1, port2 = free_port(), free_port()
    with backend(echo) as be:
        one = config_text(f"127.0.0.1:{port1}", [be.address])
        two = one + (
            f'\n[[listeners]]\nname = "second"\nbind = "127.0.0.1:{port2}"\npool = "main"\n'
        )
        with l4lb(tmp_path, one) as lb:
            held = connect(port1)
            held.sendall(b"a")
            assert held.recv(1) == b"a"
            lb.reload(two)
            c2 = connect(port2)
            c2.sendall(b"b")
            assert c2.recv(1) == b"b"
            c2.close()
            lb.reload(
                two.replace('name = "main"', 'name = "renamed"').replace(
                    f"127.0.0.1:{port1}", f"127.0.0.1:{free_port()}"
                )
            )
            with pytest.raises(OSError):
                connect(port1).recv(1)  # the removed listener no longer accepts
            held.sendall(b"c")  # but its connection carries on
            assert held.recv(1) == b"c"
            held.close()


def test_steady_traffic_through_reloads(tmp_path: Path) -> None:
    port = free_port()
    failures: list[str] = []
    done = threading.Event()

    def traffic() -> None:
        n = 0
        while not done.is_set():
            n += 1
            payload = f"request {n}".encode() * 50
            try:
                c = connect(port)
                c.sendall(payload)
                c.shutdown(socket.SHUT_WR)
                if recv_all(c) != payload:
                    failures.append(f"truncated {n}")
                c.close()
            except OSError as err:
                failures.append(f"{n}: {err!r}")

    with backend(echo) as a, backend(echo) as b:
        texts = [config_text(f"127.0.0.1:{port}", [x.address]) for x in (a, b)]
        with l4lb(tmp_path, texts[0]) as lb:
            worker = threading.Thread(target=traffic)
            worker.start()
            for i in range(10):
                lb.reload(texts[i % 2 - 1])
            done.set()
            worker.join(30)
            assert failures == []
            assert len(a.seen) > 0 and len(b.seen) > 0


def test_sigterm_exit_0_and_started_line(tmp_path: Path) -> None:
    lb = start_l4lb(tmp_path, config_text(f"127.0.0.1:{free_port()}", ["127.0.0.1:9"]))
    try:
        assert "event=started" in lb.log_text()
        lb.proc.send_signal(signal.SIGINT)
        assert lb.proc.wait(15) == 0, lb.log_text()
        assert "event=stopped" in lb.log_text(), lb.log_text()
        assert "Traceback" not in lb.log_text(), lb.log_text()
    finally:
        lb.stop()


def test_backend_max_conns_and_no_backend(tmp_path: Path) -> None:
    port = free_port()
    with backend(echo) as a, backend(echo) as b:
        text = config_text(
            f"127.0.0.1:{port}",
            [{"address": a.address, "max_conns": 1}, b.address],
        )
        with l4lb(tmp_path, text) as lb:
            held = connect(port)  # round robin: the first goes to a
            held.sendall(b"x")
            assert held.recv(1) == b"x"
            others = []
            for _ in range(3):
                c = connect(port)
                c.sendall(b"y")
                assert c.recv(1) == b"y"
                others.append(c)
            assert (len(a.seen), len(b.seen)) == (1, 3)  # a is full: skipped
            for c in [held, *others]:
                c.close()
            lb.wait_access(4)
        text = config_text(f"127.0.0.1:{port}", [{"address": a.address, "weight": 0}])
        with l4lb(tmp_path / "none", text) as lb:
            # refused with a RST at once: it can beat connect()'s return on a busy machine
            with pytest.raises(ConnectionResetError):
                c = connect(port)
                c.settimeout(5)
                c.recv(1)
            (line,) = lb.wait_access(1)
            assert line["end"] == "no_backend"
            lb.wait_log("event=no_backend")


def test_unwritable_access_log_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "l4lb.toml"
    path.write_text(
        config_text(
            f"127.0.0.1:{free_port()}", ["127.0.0.1:9"], access_log="/nonexistent/dir/access.log"
        )
    )
    result = run(["--config", str(path)])
    assert result.returncode == 1
    assert "/nonexistent/dir/access.log" in result.stderr
    assert "Traceback" not in result.stderr


def test_client_hello_split_across_segments_is_waited_for(tmp_path: Path) -> None:
    from tests.balancer.test_tls_peek import client_hello

    hello_bytes = client_hello("split.example.test", ["h2"])
    got: list[bytes] = []

    def handler(sock: socket.socket, header: ProxyHeader | None, early: bytes) -> None:
        got.append(early + recv_all(sock))

    port = free_port()
    with backend(handler) as be:
        text = config_text(
            f"127.0.0.1:{port}",
            [be.address],
            pool={"proxy_tlvs": ["authority", "alpn"], "tls_peek_timeout": "3s"},
        )
        with l4lb(tmp_path, text):
            client = connect(port)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # two segments (TCP_NODELAY); that the peek runs between them is driven in-process by
            # test_connection.py::test_a_client_hello_split_over_two_segments_is_waited_for
            client.sendall(hello_bytes[:40])
            client.sendall(hello_bytes[40:])
            client.shutdown(socket.SHUT_WR)
            assert wait_for(lambda: bool(got))
            header = be.seen[0].header
            assert header is not None
            assert header.authority == "split.example.test"
            assert header.alpn == b"h2"
            assert got[0] == hello_bytes
            client.close()


# -- ``l4lb run`` refusing to start says which key is wrong and what would do, with exit 1.


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(
    ("access", "why"),
    [
        ("/nonexistent/dir/access.log", "No such file"),
        ("logs/access.log", "No such file"),  # relative to the config file, not the cwd
        (".", "Is a directory"),
    ],
)
def test_unusable_access_log(tmp_path: Path, workers: int, access: str, why: str) -> None:
    path = tmp_path / "l4lb.toml"
    text = config_text(f"127.0.0.1:{free_port()}", ["127.0.0.1:9"], access_log=access)
    path.write_text(text.replace("workers = 1", f"workers = {workers}"))
    result = subprocess.run(
        [sys.executable, "-m", "l4lb", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert result.returncode == 1, result.stderr
    # refused with the config errors, as `l4lb check` refuses it (the same message, its line)
    line = next(ln for ln in result.stderr.splitlines() if "log.access: cannot open" in ln)
    shown = line.split("log.access: cannot open ", 1)[1].split(": ", 1)[0]
    assert os.path.normpath(shown) == os.path.normpath(tmp_path / access), line
    assert why in line
    assert "(line " in line
    if why == "Is a directory":
        assert "expected a writable file path, 'stdout' or 'off'" in line
    else:
        assert f"directory {os.path.dirname(shown)} does not exist" in line
    assert "Traceback" not in result.stderr
