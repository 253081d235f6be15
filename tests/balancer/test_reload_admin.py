"""Hot reload and the admin API's state changes in a real ``l4lb run`` under steady traffic.

Client threads loop short connections through l4lb, each checking its echoed payload, while
the config alternates 20 times between two valid versions (weights change, a listener comes
and goes), by ``POST /reload`` and by SIGHUP. Not one connection may fail or be truncated.
An invalid config is refused with its errors and the old one keeps serving.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import threading
from pathlib import Path

from tests.observe.live import L4LB, Ports, Running, eventually, http, l4lb_run
from tests.support.echo_backend import EchoBackend, echo_through
from tests.support.logs import wait_line
from tests.support.peers import stop_process

TOKEN = "s3cret-token"


def config(ports: Ports, extra: bool, a: str, b: str, weight_a: int) -> str:
    extra_listener = (
        f'[[listeners]]\nname = "extra"\nbind = "127.0.0.1:{ports["extra"]}"\npool = "web"\n'
        if extra
        else ""
    )
    return f"""
workers = 1
drain_timeout = "5s"

[[listeners]]
name = "front"
bind = "127.0.0.1:{ports["front"]}"
pool = "web"

{extra_listener}
[pools.web]
send_proxy = "v2"
backends = [{{ address = "{a}", weight = {weight_a} }}, {{ address = "{b}", weight = 1 }}]

[pools.web.health]
check = "proxy-local"
interval = "500ms"

[log]
access = "off"

[admin]
bind = "127.0.0.1:{ports["admin"]}"
token = "{TOKEN}"
"""


class Traffic:
    """Client threads looping connections with random payloads, recording every failure."""

    def __init__(self, port: int, threads: int = 3) -> None:
        self.port = port
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.loop, args=(i,)) for i in range(threads)]

    def loop(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            payload = rng.randbytes(rng.randint(1, 32768))
            try:
                name, echoed = echo_through("127.0.0.1", self.port, payload, timeout=15)
                error = "" if echoed == payload else f"{name}: {len(echoed)}/{len(payload)} bytes"
            except OSError as err:
                error = repr(err)
            with self.lock:
                if error:
                    self.failures.append(error)
                else:
                    self.ok += 1

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def reloads(lb: Running) -> int:
    return int(lb.status()["reloads"])


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


class Held:
    """A long-lived connection through l4lb that must keep working across reloads."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.name = self.read(2).decode()  # "a\n" or "b\n": the backend's greeting

    def read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, f"held connection closed after {data!r}"
            data += chunk
        return data

    def ping(self, text: str) -> None:
        self.sock.sendall(text.encode())
        assert self.read(len(text)) == text.encode()

    def finish(self) -> None:
        self.ping("last")
        self.sock.shutdown(socket.SHUT_WR)
        assert self.sock.recv(10) == b""  # a clean end, no reset
        self.sock.close()


def test_twenty_reloads_under_traffic(tmp_path: Path) -> None:
    a, b = EchoBackend("a").start(), EchoBackend("b").start()
    ports = Ports()
    version_a = config(ports, False, a.address, b.address, 1)
    version_b = config(ports, True, a.address, b.address, 3)
    try:
        with l4lb_run(tmp_path, version_a) as lb:
            front = lb.port("front")
            extra = 0
            held = [Held(front)]  # opened before the reloads, used after each one
            with Traffic(front) as traffic:
                for i in range(20):
                    lb.config.write_text(version_b if i % 2 == 0 else version_a)
                    before = reloads(lb)
                    if i % 4 < 2:
                        code, body = lb.post("/reload", TOKEN)
                        assert code == 200, body
                        assert json.loads(body)["reloaded"] is True
                    else:
                        lb.proc.send_signal(signal.SIGHUP)
                    eventually(lambda n=before: reloads(lb) == n + 1, what=f"reload {i}")
                    # interleave: some connections complete between any two reloads
                    done = traffic.ok
                    eventually(lambda n=done: traffic.ok >= n + 3, what="traffic between reloads")
                    weights = [x["weight"] for x in lb.status()["pools"][0]["backends"]]
                    listeners = [x["name"] for x in lb.status()["listeners"]]
                    assert lb.port("front") == front
                    if i % 2 == 0:
                        assert weights == [3, 1] and listeners == ["front", "extra"]
                        extra = lb.port("extra")
                        assert extra == ports["extra"]
                        assert echo_through("127.0.0.1", extra, b"via extra")[1] == b"via extra"
                        if i == 0:  # accepted by a listener that the next reload removes
                            held.append(Held(extra))
                    else:
                        assert weights == [1, 1] and listeners == ["front"]
                        eventually(lambda p=extra: not accepts(p), what="extra listener closed")
                    for h in held:
                        h.ping(f"after reload {i};")

                # an invalid config is refused, with its errors; the running one keeps serving
                lb.config.write_text(version_a.replace('send_proxy = "v2"', 'send_proxy = "v9"'))
                code, body = lb.post("/reload", TOKEN)
                doc = json.loads(body)
                assert code == 422 and doc["reloaded"] is False
                assert any("pools.web.send_proxy" in e for e in doc["errors"]), doc
                lb.proc.send_signal(signal.SIGHUP)
                eventually(
                    lambda: lb.log_text().count("pools.web.send_proxy") >= 2, what="SIGHUP error"
                )
                assert reloads(lb) == 20
                assert echo_through("127.0.0.1", front, b"still here")[1] == b"still here"
                ok_before = traffic.ok
                eventually(lambda: traffic.ok > ok_before + 10, what="traffic keeps flowing")
                for h in held:
                    h.finish()
            assert lb.proc.poll() is None
    finally:
        a.stop()
        b.stop()
    assert traffic.failures == []
    assert traffic.ok > 50
    print(f"{traffic.ok} connections through 20 reloads and 2 refused ones, none failed")


def test_admin_state_changes_need_the_token(tmp_path: Path) -> None:
    a, b = EchoBackend("a").start(), EchoBackend("b").start()
    cfg = config(Ports(), False, a.address, b.address, 1)
    path = f"/pools/web/backends/{b.address}"
    try:
        with l4lb_run(tmp_path, cfg) as lb:
            front = lb.port("front")
            status = lb.status()
            assert [x["name"] for x in status["listeners"]] == ["front"]
            assert status["pools"][0]["check"] == "proxy-local"
            for action in ("drain", "disable", "enable"):
                code, body = lb.post(f"{path}/{action}")
                assert code == 401 and b"Bearer" in body
                code, _ = lb.post(f"{path}/{action}", "wrong")
                assert code == 401
                assert lb.backend("web", b.address)["state"] == "up"
                assert lb.post("/reload")[0] == 401

            # drain: no new connections for b, a connection already open runs on
            held = socket.create_connection(("127.0.0.1", front), timeout=10)
            held_name = held.recv(2).decode()[0]
            if held_name == "a":  # make sure the held connection is on b
                held.close()
                held = socket.create_connection(("127.0.0.1", front), timeout=10)
                held_name = held.recv(2).decode()[0]
            assert held_name == "b"
            code, body = lb.post(f"{path}/drain", TOKEN)
            assert code == 200 and json.loads(body)["state"] == "drain"
            assert lb.backend("web", b.address)["state"] == "drain"
            names = {echo_through("127.0.0.1", front, b"x")[0] for _ in range(6)}
            assert names == {"a"}
            held.sendall(b"still open")
            held.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := held.recv(100):
                data += chunk
            assert data == b"still open"
            held.close()

            code, body = lb.post(f"{path}/disable", TOKEN)
            assert code == 200 and json.loads(body)["state"] == "disabled"
            assert {echo_through("127.0.0.1", front, b"x")[0] for _ in range(6)} == {"a"}
            code, body = lb.post(f"{path}/enable", TOKEN)
            assert code == 200 and json.loads(body)["state"] == "up"
            assert {echo_through("127.0.0.1", front, b"x")[0] for _ in range(6)} == {"a", "b"}

            assert lb.post("/pools/web/backends/127.0.0.1:1/drain", TOKEN)[0] == 404
            assert lb.post("/pools/nope/backends/127.0.0.1:1/drain", TOKEN)[0] == 404
            assert lb.get("/reload")[0] == 405
            lb.wait_log("event=backend_state pool=web backend=" + b.address)
    finally:
        a.stop()
        b.stop()


def test_admin_bind_failure_is_logged_and_a_reload_moves_it(tmp_path: Path) -> None:
    """A taken admin port is logged, traffic still flows; a reload to a free port brings it up."""
    a, b = EchoBackend("a").start(), EchoBackend("b").start()
    ports = Ports()
    taken = socket.socket()
    taken.bind(("127.0.0.1", ports["admin"]))
    taken.listen()
    cfg = config(ports, False, a.address, b.address, 1)
    path = tmp_path / "l4lb.toml"
    path.write_text(cfg)
    log = tmp_path / "l4lb.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([L4LB, "run", "--config", str(path)], stdout=out, stderr=out)
    try:
        text = wait_line(log, "event=admin_bind_failed", timeout=20)
        assert f"bind=127.0.0.1:{ports['admin']}" in text
        assert echo_through("127.0.0.1", ports["front"], b"still serving")[1] == b"still serving"
        moved = Ports()
        path.write_text(cfg.replace(str(ports["admin"]), str(moved["admin"])))
        proc.send_signal(signal.SIGHUP)
        eventually(lambda: f"url=http://127.0.0.1:{moved['admin']}/" in log.read_text())
        code, body = http(f"http://127.0.0.1:{moved['admin']}/status")
        assert code == 200 and json.loads(body)["reloads"] == 1
        code, _ = http(f"http://127.0.0.1:{moved['admin']}/status", "HEAD")
        assert code == 200
    finally:
        stop_process(proc)
        taken.close()
        a.stop()
        b.stop()
