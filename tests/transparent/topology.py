"""Namespaces for the transparent-mode tests, and the legacy backends that run in them.

Every namespace is named ``l4t-<run>-<role>`` (:mod:`tests.support.netns`) and is removed by
``Namespaces.close`` (the tests' fixture finalizers), with whatever still runs in it.
Documentation addresses only.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.support.logs import complete_lines
from tests.support.netns import Namespace, Namespaces, write_nginx_conf
from tests.support.peers import wait_for

ROOT = Path(__file__).resolve().parents[2]

NGINX_HTTP = """\
    log_format legacy '$remote_addr $remote_port $server_port $request_uri';
    server {{
{listens}
        access_log {dir}/nginx-access.log legacy;
        location / {{ return 200 "hello $remote_addr\\n"; }}
    }}"""
"""nginx WITHOUT proxy_protocol: ``$remote_addr`` is the socket's peer."""


def new_spaces() -> Namespaces:
    """This suite's namespaces: prefix ``l4t-``, IPv6 addresses usable at once (no DAD)."""
    return Namespaces("l4t", nodad=True)


def start_nginx(spaces: Namespaces, ns: Namespace, workdir: Path, binds: list[str]) -> Path:
    """nginx (no PROXY) on ``binds`` in ``ns``; returns its access log's path."""
    listens = "\n".join(f"        listen {b};" for b in binds)
    http = NGINX_HTTP.format(dir=workdir, listens=listens)
    conf = write_nginx_conf(workdir, http, worker_connections=256)
    spaces.start(ns, ["nginx", "-p", str(workdir), "-c", str(conf)], workdir / "nginx.out")
    for bind in binds:
        assert wait_for(lambda b=bind: port_open(ns, b), 15), f"nginx not up on {bind}"
    return workdir / "nginx-access.log"


def start_legacy(spaces: Namespaces, ns: Namespace, workdir: Path, binds: list[str]) -> Path:
    """The socketserver backend (no PROXY) on ``binds`` in ``ns``; returns its log's path."""
    log = workdir / "legacy.log"
    args = [sys.executable, "-m", "tests.transparent.legacy_server", str(log), *binds]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    spaces.start(ns, args, workdir / "legacy.out", env=env)
    for bind in binds:
        assert wait_for(lambda b=bind: port_open(ns, b), 15), f"legacy server not up on {bind}"
    return log


def start_l4lb(
    spaces: Namespaces, ns: Namespace, workdir: Path, name: str, config: str
) -> subprocess.Popen[bytes]:
    """``l4lb run`` in ``ns``; its stderr in ``workdir/NAME.log``, its config ``NAME.toml``."""
    path = workdir / f"{name}.toml"
    path.write_text(config)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return spaces.start(
        ns, [sys.executable, "-m", "l4lb", "run", "--config", str(path)], workdir / f"{name}.log",
        env=env,
    )  # fmt: skip


def wait_started(proc: subprocess.Popen[bytes], log: Path, timeout: float = 20) -> None:
    ok = wait_for(lambda: "event=started" in log.read_text() or proc.poll() is not None, timeout)
    assert ok and proc.poll() is None, f"l4lb did not start:\n{log.read_text()}"


def hostport(bind: str) -> tuple[str, int]:
    host, _, port = bind.rpartition(":")
    return host.strip("[]"), int(port)


def port_open(ns: Namespace, bind: str) -> bool:
    return ns.port_open(*hostport(bind))


def request(ns: Namespace, source: str, bind: str, payload: bytes, timeout: float = 10) -> bytes:
    """From ``source`` in ``ns``: send ``payload``, then a FIN; read the answer until EOF."""
    host, port = hostport(bind)
    s = ns.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(timeout)
    try:
        s.bind((source, 0))
        s.connect((host, port))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = bytearray()
        while chunk := s.recv(65536):
            out += chunk
        return bytes(out)
    finally:
        s.close()


def http_get(path: str) -> bytes:
    return f"GET {path} HTTP/1.0\r\nHost: legacy\r\n\r\n".encode()


def log_words(path: Path) -> list[list[str]]:
    """A backend log's complete lines, split (a partial last line is left out)."""
    return [line.split() for line in complete_lines(path) if line]


def fixes(log: Path) -> list[str]:
    """The commands l4lb said to run (``fix='...'`` in its log)."""
    out = []
    for line in log.read_text().splitlines():
        if " fix='" in line:
            out.append(line.split(" fix='", 1)[1].rstrip("'"))
    return out
