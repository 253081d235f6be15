"""Spoofing through the real balancer: a forged PROXY header from an untrusted peer never reaches
the backend (real nginx with ``proxy_protocol``); the same bytes from a trusted peer do."""

from __future__ import annotations

import contextlib
from pathlib import Path

from tests.support.l4lb import config_text, l4lb
from tests.support.logs import complete_lines
from tests.support.peers import connect_from, free_port, nginx, wait_for

FORGED = b"PROXY TCP4 198.51.100.42 203.0.113.7 51000 443\r\n"


def nginx_stream(port: int) -> str:
    return (
        "log_format pp '$proxy_protocol_addr $proxy_protocol_port $remote_addr';\n"
        f"server {{ listen 127.0.0.1:{port} proxy_protocol;\n"
        "  access_log {dir}/stream.log pp;\n"
        '  return "hello from nginx\\n"; }\n'
    )


def exchange(source: str, port: int, data: bytes) -> bytes:
    """Send ``data`` from ``source``; everything received until the balancer or nginx closes."""
    with connect_from(source, "127.0.0.1", port) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except ConnectionResetError:
            pass
    return received


def stream_log(workdir: Path) -> list[str]:
    return complete_lines(workdir / "stream.log")


def test_forged_header_untrusted_closed_trusted_honoured(tmp_path: Path) -> None:
    nginx_port, lb_port = free_port(), free_port()
    ngx = tmp_path / "nginx"
    with nginx(ngx, stream=nginx_stream(nginx_port), wait=[("127.0.0.1", nginx_port)]):
        # wait_port's probe is a connection nginx logs (a broken header): count from here
        wait_for(lambda: len(stream_log(ngx)) >= 1, 5)
        probes = len(stream_log(ngx))
        config = config_text(
            f"127.0.0.1:{lb_port}",
            [f"127.0.0.1:{nginx_port}"],
            pool={"send_proxy": "v1"},
            listener={
                "accept_proxy": "required",
                "trusted_proxies": ["127.0.0.1/32"],
                "proxy_header_timeout": "2s",
            },
        )
        with l4lb(tmp_path / "lb", config) as lb:
            # 127.0.0.9 is not trusted: closed, nothing from nginx, the log says why
            assert exchange("127.0.0.9", lb_port, FORGED + b"hi\n") == b""
            lines = lb.wait_access(1)
            assert lines[0]["event"] == "rejected"
            assert lines[0]["reason"] == "untrusted"
            assert lines[0]["peer"].startswith("127.0.0.9:")
            assert wait_for(lambda: "reason=untrusted" in lb.log_text(), 5)
            assert "peer=127.0.0.9:" in lb.log_text()

            # the same bytes from 127.0.0.1 (trusted): nginx logs the claimed client
            assert exchange("127.0.0.1", lb_port, FORGED + b"hi\n") == b"hello from nginx\n"
            assert wait_for(lambda: len(stream_log(ngx)) >= probes + 1, 10)
            logged = stream_log(ngx)[probes:]
            assert logged == ["198.51.100.42 51000 127.0.0.1"]
            access = lb.wait_access(2)
            assert access[1]["event"] == "connection"
            assert access[1]["client"] == "198.51.100.42:51000"
            assert access[1]["upstream"].startswith("127.0.0.1:")


def test_optional_spoofing_attempt_closed_direct_client_served(tmp_path: Path) -> None:
    nginx_port, lb_port = free_port(), free_port()
    ngx = tmp_path / "nginx"
    with nginx(ngx, stream=nginx_stream(nginx_port), wait=[("127.0.0.1", nginx_port)]):
        wait_for(lambda: len(stream_log(ngx)) >= 1, 5)
        probes = len(stream_log(ngx))
        config = config_text(
            f"127.0.0.1:{lb_port}",
            [f"127.0.0.1:{nginx_port}"],
            pool={"send_proxy": "v2"},
            listener={"accept_proxy": "optional", "trusted_proxies": ["127.0.0.1/32"]},
        )
        with l4lb(tmp_path / "lb", config) as lb:
            assert exchange("127.0.0.9", lb_port, FORGED + b"hi\n") == b""
            rejected = lb.wait_access(1)[0]
            assert (rejected["event"], rejected["reason"]) == ("rejected", "spoofing_attempt")
            # a direct client of the same listener, without a header, is served as itself
            with connect_from("127.0.0.9", "127.0.0.1", lb_port) as sock:
                own_port = sock.getsockname()[1]
                sock.sendall(b"hi\n")
                sock.settimeout(10)
                assert sock.recv(100) == b"hello from nginx\n"
            assert wait_for(lambda: len(stream_log(ngx)) >= probes + 1, 10)
            assert stream_log(ngx)[probes:] == [f"127.0.0.9 {own_port} 127.0.0.1"]
            assert not any(
                (line.get("client") or "").startswith("198.51.100.42") for line in lb.access_lines()
            )


def test_rejected_connection_is_closed_without_reading(tmp_path: Path) -> None:
    """An untrusted peer in required mode is closed before it sends anything."""
    lb_port = free_port()
    config = config_text(
        f"127.0.0.1:{lb_port}",
        ["127.0.0.1:9"],
        listener={"accept_proxy": "required", "trusted_proxies": ["127.0.0.1/32"]},
    )
    with l4lb(tmp_path / "lb", config) as lb:
        with connect_from("127.0.0.9", "127.0.0.1", lb_port) as sock:
            sock.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(10) == b""
        assert lb.wait_access(1)[0]["reason"] == "untrusted"
