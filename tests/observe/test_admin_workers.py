"""One admin API for a balancer with two worker processes (``workers = 2``).

Each worker keeps its own counters and state; the worker holding ``[admin] bind`` must
answer for both: counters add up, drain reaches both, reload reaches both, and when that
worker dies the API comes back.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path

from l4lb.observe import cluster
from tests.observe.live import Ports, eventually, l4lb_run
from tests.support.echo_backend import EchoBackend
from tests.support.peers import connect_from

TOKEN = "t0ken"


def through(source: str, port: int, payload: bytes) -> str:
    """One connection from ``source`` (distinct sources reach different workers)."""
    with connect_from(source, "127.0.0.1", port, timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(1)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    name, _, echoed = data.partition(b"\n")
    assert echoed == payload
    return name.decode()


def total_of(worker_socket: str) -> int:
    """Connections one worker counted, from its private admin socket."""
    status, body = asyncio.run(cluster.request(worker_socket, "GET", "/snapshot"))
    assert status == 200
    return int(json.loads(body)["listeners"][0]["total"])


def test_two_workers_one_api(tmp_path: Path) -> None:
    a, b = EchoBackend("a").start(), EchoBackend("b").start()
    ports = Ports()
    config = f"""
workers = 2
drain_timeout = "2s"

[[listeners]]
name = "front"
bind = "127.0.0.1:{ports["front"]}"
pool = "web"

[pools.web]
send_proxy = "v2"
backends = [{{ address = "{a.address}" }}, {{ address = "{b.address}" }}]

[pools.web.health]
check = "tcp"
interval = "300ms"

[log]
access = "off"

[admin]
bind = "127.0.0.1:{ports["admin"]}"
token = "{TOKEN}"
"""
    sources = [f"127.0.{i}.{j}" for i in range(1, 5) for j in range(2, 7)]  # 20 clients
    try:
        with l4lb_run(tmp_path, config) as lb:
            eventually(lambda: lb.status()["workers"] == 2, what="both workers in /status")
            front = ports["front"]
            for source in sources:
                through(source, front, b"hello")
            status = lb.status()
            backends = status["pools"][0]["backends"]
            assert status["listeners"][0]["total"] == 20
            assert sum(x["total"] for x in backends) == 20
            # ... and the 20 really were split between the workers (asked one by one)
            per_worker = [total_of(name) for name in cluster.peer_sockets(lb.proc.pid, 0)]
            assert len(per_worker) == 2 and sum(per_worker) == 20 and min(per_worker) > 0

            # drain b through the one API: no worker sends it anything new
            code, body = lb.post(f"/pools/web/backends/{b.address}/drain", TOKEN)
            assert code == 200 and json.loads(body)["state"] == "drain", body
            assert {through(s, front, b"x") for s in sources} == {"a"}
            lb.post(f"/pools/web/backends/{b.address}/enable", TOKEN)
            assert {through(s, front, b"x") for s in sources} == {"a", "b"}

            # a reload through the API reaches both workers
            lb.config.write_text(config.replace('interval = "300ms"', 'interval = "400ms"'))
            code, body = lb.post("/reload", TOKEN)
            assert code == 200, body
            eventually(lambda: lb.log_text().count("event=reloaded") == 2, what="2 reloads")

            # the worker serving the API dies: the API comes back (the surviving worker or
            # the one the supervisor starts in its place takes the bind)
            holder = int(re.findall(r"event=admin_listening url=\S+ pid=(\d+)", lb.log_text())[0])
            os.kill(holder, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while True:
                try:
                    if lb.status()["workers"] == 2:
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "the admin API did not come back"
                time.sleep(0.2)
            assert lb.wait_log("event=admin_listening", 2).count("event=admin_listening") == 2
    finally:
        a.stop()
        b.stop()
