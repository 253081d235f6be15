"""A listener's ``monitor`` port (HAProxy's ``monitor-uri`` / ``monitor fail``): ``200`` while
that listener's pool has an up backend and the node is not stopping, ``503`` with the reason
otherwise, so an upstream balancer checks one service, not the whole node."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.support.echo_backend import EchoBackend
from tests.support.l4lb import config_text, l4lb
from tests.support.logs import complete_text
from tests.support.peers import free_port, haproxy, wait_for

FAST_CHECKS = {"check": "tcp", "interval": "200ms", "timeout": "500ms", "rise": 1, "fall": 1}


def _ask(port: int, request: bytes = b"GET / HTTP/1.1\r\nHost: m\r\n\r\n") -> tuple[int, str]:
    """One request to a monitor port: (status, body); (0, error) when nothing listens."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request)
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
    except ConnectionRefusedError as err:
        return 0, str(err)
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body.decode()


def _two_services(
    ports: dict[str, int], web: str, api: str, monitor_api: bool = True, **top: object
) -> str:
    """Listener web (pool main, backend ``web``) and listener api (pool api, backend ``api``),
    each with a monitor port."""
    text = config_text(
        f"127.0.0.1:{ports['web']}",
        [web],
        health=FAST_CHECKS,
        listener={"monitor": f"127.0.0.1:{ports['web_monitor']}"},
        top=top or None,
    )
    monitor = f'monitor = "127.0.0.1:{ports["api_monitor"]}"\n' if monitor_api else ""
    text += (
        f'\n[[listeners]]\nname = "api"\nbind = "127.0.0.1:{ports["api"]}"\npool = "api"\n'
        + monitor
        + f'\n[pools.api]\nbackends = [{{ address = "{api}" }}]\n'
        + "[pools.api.health]\n"
        + "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in FAST_CHECKS.items())
    )
    return text


def test_each_listener_has_its_own_verdict(tmp_path: Path) -> None:
    ports = {k: free_port() for k in ("web", "web_monitor", "api", "api_monitor")}
    web = EchoBackend("web").start()
    web_port = web.port
    try:
        with EchoBackend("api") as api:
            dead = f"127.0.0.1:{free_port()}"  # nothing listens: down after one check
            config = _two_services(ports, web.address, dead)
            with l4lb(tmp_path / "lb", config) as lb:
                assert wait_for(lambda: _ask(ports["web_monitor"])[0] == 200, 10)
                status, body = _ask(ports["web_monitor"])
                assert body == "ready: listener main: pool main has 1 of 1 backends up\n", body
                assert wait_for(lambda: _ask(ports["api_monitor"])[0] == 503, 10)
                status, body = _ask(ports["api_monitor"])
                assert body == "not ready: listener api: pool api has no up backend (0 of 1)\n"
                # one service's backend goes: only its monitor says so
                web.stop()
                assert wait_for(lambda: _ask(ports["web_monitor"])[0] == 503, 10)
                web = EchoBackend("web", port=web_port).start()
                assert wait_for(lambda: _ask(ports["web_monitor"])[0] == 200, 10)
                # HEAD, a wrong method, a non-HTTP line: answered, each with what to do
                assert _ask(ports["web_monitor"], b"HEAD / HTTP/1.0\r\n\r\n") == (200, "")
                options = _ask(ports["web_monitor"], b"OPTIONS / HTTP/1.0\r\n\r\n")
                assert options[0] == 200  # a bare `option httpchk`
                assert _ask(ports["web_monitor"], b"POST / HTTP/1.1\r\n\r\n") == (405, "use GET\n")
                status, body = _ask(ports["web_monitor"], b"hello\r\n\r\n")
                assert status == 400 and "GET / HTTP/1.1" in body
                # a reload gives the api listener a working backend and takes web's monitor away
                lb.reload(
                    _two_services(ports, web.address, api.address).replace(
                        f'monitor = "127.0.0.1:{ports["web_monitor"]}"\n', ""
                    )
                )
                assert wait_for(lambda: _ask(ports["api_monitor"])[0] == 200, 10), lb.log_text()
                assert wait_for(lambda: _ask(ports["web_monitor"])[0] == 0, 10)
                assert "event=monitor_listening listener=api" in lb.log_text()
                # a graceful stop: 503 (draining) while a connection finishes
                held = socket.create_connection(("127.0.0.1", ports["api"]), timeout=10)
                held.sendall(b"hold\n")
                assert held.recv(4) == b"api\n"
                lb.proc.terminate()
                assert wait_for(lambda: "event=draining" in lb.log_text(), 10)
                status, body = _ask(ports["api_monitor"])
                held.close()
                assert (status, body) == (
                    503,
                    "not ready: stopping: a stop signal was received, the node is draining\n",
                )
    finally:
        web.stop()


def _haproxy_states(workdir: Path, server: str) -> list[str]:
    """HAProxy's verdicts on ``server`` ("UP" or "DOWN"), in order."""
    states = []
    for line in complete_text(workdir / "haproxy.log").splitlines():
        if f"Server {server} is DOWN" in line:
            states.append("DOWN")
        elif f"Server {server} is UP" in line:
            states.append("UP")
    return states


def test_haproxy_checks_one_service_through_its_monitor_port(tmp_path: Path) -> None:
    """HAProxy in front, one backend per l4lb service, each checked on its monitor port: the
    service whose pool empties is marked down, the other stays up (with workers = 2)."""
    ports = {k: free_port() for k in ("web", "web_monitor", "api", "api_monitor")}
    front_web, front_api = free_port(), free_port()
    hap = tmp_path / "haproxy"
    web = EchoBackend("web").start()
    web_port = web.port
    body = "".join(
        f"frontend {name}\n"
        f"    bind 127.0.0.1:{front}\n"
        f"    default_backend {name}_l4lb\n"
        f"backend {name}_l4lb\n"
        "    option httpchk GET /\n"
        "    http-check expect status 200\n"
        f"    server lb 127.0.0.1:{ports[name]} check port {ports[name + '_monitor']}"
        " inter 200ms fall 1 rise 1\n"
        for name, front in (("web", front_web), ("api", front_api))
    )
    try:
        with EchoBackend("api") as api:
            config = _two_services(ports, web.address, api.address, workers=2)
            with (
                l4lb(tmp_path / "lb", config),
                haproxy(hap, body, wait=[("127.0.0.1", front_web), ("127.0.0.1", front_api)]),
            ):
                assert wait_for(lambda: _ask(ports["web_monitor"])[0] == 200, 10)
                for front, name in ((front_web, b"web\n"), (front_api, b"api\n")):
                    with socket.create_connection(("127.0.0.1", front), timeout=10) as sock:
                        sock.sendall(b"via haproxy\n")
                        assert sock.recv(4) == name
                web.stop()
                log = lambda: complete_text(hap / "haproxy.log")  # noqa: E731
                assert wait_for(lambda: "DOWN" in _haproxy_states(hap, "web_l4lb/lb"), 15), log()
                assert "DOWN" not in _haproxy_states(hap, "api_l4lb/lb"), log()
                with socket.create_connection(("127.0.0.1", front_api), timeout=10) as sock:
                    sock.sendall(b"still\n")
                    assert sock.recv(4) == b"api\n"
                web = EchoBackend("web", port=web_port).start()
                assert wait_for(lambda: _haproxy_states(hap, "web_l4lb/lb")[-1:] == ["UP"], 15), (
                    log()
                )
    finally:
        web.stop()


def test_check_refuses_a_monitor_on_a_taken_port(tmp_path: Path) -> None:
    ports = {k: free_port() for k in ("web", "web_monitor", "api", "api_monitor")}
    ports["api_monitor"] = ports["web"]  # the web listener's own port
    path = tmp_path / "l4lb.toml"
    path.write_text(_two_services(ports, "127.0.0.1:1", "127.0.0.1:2"))
    done = subprocess.run(
        [sys.executable, "-m", "l4lb", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done
    assert "listeners[1].monitor" in done.stderr + done.stdout
    assert "is also listeners[0].bind: give the monitor a port of its own" in (
        done.stderr + done.stdout
    )
