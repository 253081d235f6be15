"""Chaining: real HAProxy (send-proxy-v2 with a unique id) -> l4lb (accept_proxy required,
pass_tlvs unique_id) -> a backend. The original client's 127.x address arrives, and the unique
id HAProxy generated arrives unchanged (and is the id in l4lb's access log)."""

from __future__ import annotations

import re
from pathlib import Path

from l4lb.proxy_protocol import Command, parse
from tests.support.echo_backend import EchoBackend
from tests.support.l4lb import config_text, l4lb
from tests.support.logs import complete_lines, complete_text
from tests.support.peers import connect_from, free_port, haproxy, nginx, wait_for

CLIENTS = ["127.0.0.21", "127.0.0.22", "127.0.0.23"]


def haproxy_body(front_port: int, lb_port: int, check: bool) -> str:
    return (
        "frontend edge\n"
        f"    bind 127.0.0.1:{front_port}\n"
        "    unique-id-format chain-%ci-%cp-%rt\n"
        '    log-format "client=%ci:%cp uid=%ID"\n'
        "    default_backend l4lb\n"
        "backend l4lb\n"
        f"    server lb 127.0.0.1:{lb_port} send-proxy-v2 proxy-v2-options unique-id"
        + (" check inter 300ms" if check else "")
        + "\n"
    )


def lb_config(lb_port: int, backend: str) -> str:
    return config_text(
        f"127.0.0.1:{lb_port}",
        [backend],
        pool={"send_proxy": "v2", "proxy_tlvs": ["unique_id"]},
        listener={
            "accept_proxy": "required",
            "trusted_proxies": ["127.0.0.1/32"],
            "pass_tlvs": ["unique_id"],
        },
    )


def haproxy_uids(workdir: Path) -> dict[str, str]:
    text = complete_text(workdir / "haproxy.log")
    return dict(re.findall(r"client=(\S+) uid=(\S+)", text))


def test_haproxy_to_l4lb_to_backend_keeps_client_and_unique_id(tmp_path: Path) -> None:
    front, lb_port = free_port(), free_port()
    hap = tmp_path / "haproxy"
    with (
        EchoBackend("echo") as backend,
        l4lb(tmp_path / "lb", lb_config(lb_port, backend.address)) as lb,
    ):
        with haproxy(hap, haproxy_body(front, lb_port, check=True), wait=[("127.0.0.1", front)]):
            own: list[str] = []
            for client in CLIENTS:
                with connect_from(client, "127.0.0.1", front) as sock:
                    own.append("{}:{}".format(*sock.getsockname()))
                    sock.sendall(b"through the chain\n")
                    sock.settimeout(10)
                    received = b""
                    while not received.endswith(b"through the chain\n"):
                        chunk = sock.recv(4096)
                        assert chunk, received
                        received += chunk
                    assert received == b"echo\nthrough the chain\n"
            assert wait_for(lambda: len(haproxy_uids(hap)) >= len(CLIENTS), 10)
            # let HAProxy's health checks (LOCAL headers) run a few times too
            assert wait_for(lambda: len(backend.headers) >= len(CLIENTS) + 3, 10)
        uids = haproxy_uids(hap)

    headers = [parse(raw)[0] for raw in backend.headers]
    proxied = {h.source: h for h in headers if h.command is Command.PROXY and h.source}
    by_client = {f"{h.source[0]}:{h.source[1]}": h for h in proxied.values()}  # type: ignore[index]
    for client in own:
        assert client in by_client, (client, by_client.keys())
        header = by_client[client]
        assert header.unique_id == uids[client].encode(), (header.unique_id, uids[client])
        assert uids[client].startswith(f"chain-{client.split(':')[0]}-")
    # HAProxy's checks arrive as LOCAL: passed on (local_checks = "pass"), counted as health
    # checks and kept out of the access log (one line per check interval otherwise)
    access = lb.access_lines()
    assert not [line for line in access if line["event"] == "rejected"], access
    assert not [line for line in access if line["client"] == line["upstream"]], access
    assert [h for h in headers if h.command is Command.PROXY and h.source is None] or any(
        h.source and h.source[0] == "127.0.0.1" for h in headers
    ), headers
    logged = {line["client"]: line for line in access if line["event"] == "connection"}
    for client in own:
        assert logged[client]["unique_id"] == uids[client]
        assert logged[client]["upstream"].startswith("127.0.0.1:")


def test_haproxy_to_l4lb_to_nginx_logs_the_original_client(tmp_path: Path) -> None:
    front, lb_port, nginx_port = free_port(), free_port(), free_port()
    ngx = tmp_path / "nginx"
    stream = (
        "log_format pp '$proxy_protocol_addr:$proxy_protocol_port';\n"
        f"server {{ listen 127.0.0.1:{nginx_port} proxy_protocol;\n"
        "  access_log {dir}/stream.log pp;\n"
        '  return "nginx\\n"; }\n'
    )
    with nginx(ngx, stream=stream, wait=[("127.0.0.1", nginx_port)]):
        log = ngx / "stream.log"
        assert wait_for(lambda: len(complete_lines(log)) >= 1, 5)  # the readiness probe
        before = len(complete_lines(log))
        with (
            l4lb(tmp_path / "lb", lb_config(lb_port, f"127.0.0.1:{nginx_port}")),
            haproxy(
                tmp_path / "haproxy",
                haproxy_body(front, lb_port, check=False),
                wait=[("127.0.0.1", front)],
            ),
        ):
            own = []
            for client in CLIENTS:
                with connect_from(client, "127.0.0.1", front) as sock:
                    own.append("{}:{}".format(*sock.getsockname()))
                    sock.settimeout(10)
                    assert sock.recv(100) == b"nginx\n"
            assert wait_for(lambda: len(complete_lines(log)) >= before + 4, 10)
    # HAProxy's own readiness probe came through the chain too, from 127.0.0.1
    seen = [line for line in complete_lines(log)[before:] if line.split(":")[0] in CLIENTS]
    assert sorted(seen) == sorted(own)
