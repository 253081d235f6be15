"""Backends added, re-weighted and removed through the admin API, on the real ``l4lb run``
under steady client traffic: not one failed connection, the token and Host rules of every
state-changing call, the reload rule (``[admin] keep_api_backends``), and ``workers = 2``."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

from tests.observe.live import Running, eventually, l4lb_run
from tests.support.echo_backend import EchoBackend
from tests.support.peers import connect_from, free_port
from tests.support.traffic import steady_traffic

TOKEN = "s3cret"


def config(a: EchoBackend, *, workers: int = 1) -> str:
    return f"""
workers = {workers}
drain_timeout = "2s"

[[listeners]]
name = "front"
bind = "127.0.0.1:{free_port()}"
pool = "web"

[pools.web]
send_proxy = "v2"
idle_timeout = "10s"
backends = [{{ address = "{a.address}" }}]

[pools.web.health]
check = "tcp"
interval = "200ms"
rise = 2
fall = 2

[log]
access = "off"

[admin]
bind = "127.0.0.1:{free_port()}"
token = "{TOKEN}"
"""


def call(lb: Running, path: str, token: str | None = TOKEN) -> tuple[int, dict[str, Any]]:
    code, body = lb.post(path, token)
    return code, json.loads(body)


def backends_of(lb: Running) -> dict[str, dict[str, Any]]:
    return {b["address"]: b for b in lb.status()["pools"][0]["backends"]}


def test_add_weight_remove_under_steady_traffic_with_no_failed_connection(
    tmp_path: Path,
) -> None:
    with (
        EchoBackend("a") as a,
        EchoBackend("b") as b,
        EchoBackend("c") as c,
        l4lb_run(tmp_path, config(a)) as lb,
        steady_traffic("127.0.0.1", lb.port("front")) as traffic,
    ):
        traffic.wait_streak({"a"}, 5)
        add_b = f"/pools/web/backends/{b.address}/add?weight=2"
        assert call(lb, add_b, token=None)[0] == 401
        code, doc = call(lb, add_b)
        assert code == 200, doc
        assert doc["origin"] == "api" and doc["weight"] == 2 and doc["state"] == "down"
        lb.wait_state("web", b.address, "up")  # rise checks first
        traffic.wait_served("b")
        assert backends_of(lb)[b.address]["origin"] == "api"
        assert backends_of(lb)[a.address]["origin"] == "config"

        code, doc = call(lb, f"/pools/web/backends/{a.address}/set?weight=0")
        assert code == 200 and doc["weight"] == 0, doc
        traffic.wait_streak({"b"}, 20)

        # a connection held open on b while b is removed: it finishes normally
        long = socket.create_connection(("127.0.0.1", lb.port("front")), timeout=10)
        assert long.recv(2) == b"b\n"
        code, doc = call(lb, f"/pools/web/backends/{c.address}/add?max_conns=50")
        assert code == 200 and doc["max_conns"] == 50, doc
        lb.wait_state("web", c.address, "up")
        code, doc = call(lb, f"/pools/web/backends/{b.address}/remove")
        assert code == 200 and doc["state"] == "drain" and doc["active"] >= 1, doc
        traffic.wait_streak({"c"}, 20)
        long.sendall(b"finish me")
        long.shutdown(socket.SHUT_WR)
        echoed = b""
        while chunk := long.recv(65536):
            echoed += chunk
        long.close()
        assert echoed == b"finish me"
        eventually(lambda: b.address not in backends_of(lb), what="b forgotten after draining")

        code, doc = call(lb, f"/pools/web/backends/{c.address}/set?max_conns=none&weight=3")
        assert code == 200 and doc["max_conns"] is None and doc["weight"] == 3, doc
        assert call(lb, f"/pools/web/backends/{a.address}/set?weight=1")[0] == 200
        traffic.wait_served("a")
        mark = traffic.mark()
        assert set(traffic.wait_more(mark, 20)) == {"a", "c"}
        traffic.stop()
        assert traffic.failures == []


def test_bad_calls_are_refused_with_what_to_do(tmp_path: Path) -> None:
    with EchoBackend("a") as a, l4lb_run(tmp_path, config(a)) as lb:
        other = f"127.0.0.1:{free_port()}"
        cases = [
            (f"/pools/web/backends/{a.address}/add", 409, "already has backend"),
            (f"/pools/web/backends/{a.address}/remove", 409, "comes from the config file"),
            (f"/pools/nope/backends/{other}/add", 404, "no pool 'nope'"),
            (f"/pools/web/backends/{other}/remove", 404, "has no backend"),
            (f"/pools/web/backends/{other}/add?weight=5000", 400, "weight='5000'"),
            (f"/pools/web/backends/{other}/add?colour=red", 400, "unknown parameter 'colour'"),
            (f"/pools/web/backends/{other}/add?weight=1&weight=2", 400, "more than once"),
            (f"/pools/web/backends/{a.address}/set", 400, "set needs weight"),
            ("/pools/web/backends/app.internal:80/add", 400, "DNS names go in the config"),
            (f"/pools/web/backends/127.0.0.1:{lb.port('front')}/add", 400, "own listener"),
        ]
        for path, status, text in cases:
            code, doc = call(lb, path)
            assert code == status and text in doc["error"], (path, code, doc)
        # the Host rule of every admin call (DNS rebinding): a foreign name is refused
        host, port = lb.admin.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request(
            "POST",
            f"/pools/web/backends/{other}/add",
            headers={"Host": "evil.example", "Authorization": f"Bearer {TOKEN}"},
        )
        assert conn.getresponse().status == 421
        conn.close()
        assert other not in backends_of(lb)


def test_a_reload_keeps_api_changes_only_when_asked(tmp_path: Path) -> None:
    with EchoBackend("a") as a, EchoBackend("b") as b:
        text = config(a)
        with l4lb_run(tmp_path, text) as lb:
            assert call(lb, f"/pools/web/backends/{b.address}/add")[0] == 200
            assert call(lb, f"/pools/web/backends/{a.address}/set?weight=7")[0] == 200
            assert call(lb, "/reload")[0] == 200  # the same file: the API's changes go
            status = backends_of(lb)
            assert set(status) == {a.address} and status[a.address]["weight"] == 1

            lb.config.write_text(text + "keep_api_backends = true\n")  # [admin] is last
            assert call(lb, "/reload")[0] == 200
            assert call(lb, f"/pools/web/backends/{b.address}/add?weight=4")[0] == 200
            assert call(lb, f"/pools/web/backends/{a.address}/set?weight=7")[0] == 200
            assert call(lb, "/reload")[0] == 200
            status = backends_of(lb)
            assert status[b.address]["origin"] == "api" and status[b.address]["weight"] == 4
            assert status[a.address]["weight"] == 7


def through(source: str, port: int) -> str:
    with connect_from(source, "127.0.0.1", port, timeout=10) as sock:
        sock.sendall(b"hi")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.partition(b"\n")[0].decode()


def test_api_backends_reach_every_worker(tmp_path: Path) -> None:
    """With workers = 2 the call is applied by each worker (client addresses are spread over
    the workers by the BPF steering, so 20 sources reach both)."""
    sources = [f"127.0.{i}.{j}" for i in range(1, 5) for j in range(2, 7)]
    with (
        EchoBackend("a") as a,
        EchoBackend("b") as b,
        l4lb_run(tmp_path, config(a, workers=2)) as lb,
    ):
        eventually(lambda: lb.status()["workers"] == 2, what="both workers in /status")
        front = lb.port("front")
        code, doc = call(lb, f"/pools/web/backends/{b.address}/add")
        assert code == 200 and "workers_failed" not in doc, doc
        lb.wait_state("web", b.address, "up")
        assert call(lb, f"/pools/web/backends/{a.address}/set?weight=0")[0] == 200
        # every worker: up only after its own checks; wait for the last of them
        eventually(
            lambda: {through(s, front) for s in sources} == {"b"},
            what="every worker sends every client to b",
        )
        assert call(lb, f"/pools/web/backends/{a.address}/set?weight=1")[0] == 200
        code, doc = call(lb, f"/pools/web/backends/{b.address}/remove")
        assert code == 200 and "workers_failed" not in doc, doc
        assert {through(s, front) for s in sources} == {"a"}
        eventually(lambda: b.address not in backends_of(lb), what="b forgotten")
