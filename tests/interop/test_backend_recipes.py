"""Every production recipe in docs/backend.md, run as written, behind real HAProxy and l4lb.

A recipe is a ```sh block after a ``<!-- recipe: NAME -->`` line. Two substitutions make it run
here: ``0.0.0.0``/``8000`` become 127.0.0.1 and a free port, ``10.0.0.0/8`` (the balancers)
becomes 127.0.0.1/32. Each recipe then faces HAProxy (``send-proxy-v2``) and ``l4lb run``
(``send_proxy = "v2"``), with clients bound to 127.0.0.7 and 127.0.0.8 making two keep-alive
requests each; the app's own view of the client must be that client. A forged header straight
from 127.0.0.9 (not a trusted balancer) gets no answer, and a killed worker leaves the others
serving.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from l4lb.proxy_protocol import build
from tests.backend.servers import closed_by_peer
from tests.support.l4lb import config_text, l4lb
from tests.support.peers import connect_from, free_port, haproxy, wait_for, wait_port

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "backend.md"
CLIENTS = ["127.0.0.7", "127.0.0.8"]

_RECIPE = re.compile(r"<!-- recipe: ([\w-]+) -->\n```sh\n(.*?)```", re.S)


def recipes() -> dict[str, str]:
    """name -> command, from the doc."""
    return {name: body.strip() for name, body in _RECIPE.findall(DOC.read_text())}


def test_every_recipe_block_is_found() -> None:
    # A recipe without its marker would silently not be run: every sh block with a server
    # command in the recipes section must be one.
    text = DOC.read_text()
    section = text[text.index("## Production recipes") : text.index("## Examples")]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) == len(recipes()) >= 10


def _local(command: str, port: int) -> str:
    return (
        command.replace("10.0.0.0/8", "127.0.0.1/32")
        .replace("0.0.0.0", "127.0.0.1")
        .replace("8000", str(port))
    )


@pytest.fixture
def run_recipe(tmp_path: Path) -> Iterator[Any]:
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str) -> tuple[subprocess.Popen[bytes], int, Path]:
        port = free_port()
        log = tmp_path / f"{name}.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        # gunicorn 27 opens a control socket at one fixed path by default: not shared here.
        env["GUNICORN_CMD_ARGS"] = "--no-control-socket"
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        proc = subprocess.Popen(
            ["bash", "-c", _local(recipes()[name], port)],
            cwd=ROOT,
            env=env,
            stdout=open(log, "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the server and its workers
        )
        started.append(proc)
        wait_port("127.0.0.1", port, timeout=30, proc=proc)
        return proc, port, log

    yield start
    for proc in started:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group we started (the server and its workers), then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(5)


def _get(sock: socket.socket) -> tuple[dict[str, Any], bool]:
    """One GET on ``sock``: the JSON body, and whether the server keeps the connection open."""
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed before the response headers: {buf!r}")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].split()[1] == "200", (head, body)
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed in the middle of the body")
        body += chunk
    result: dict[str, Any] = json.loads(body[:length])
    return result, headers.get("connection", "").lower() != "close"


def _group_members(pgid: int) -> set[int]:
    members = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                members.add(int(entry.name))
    return members


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited (reaped, or a zombie its parent has yet to reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


MULTI_WORKER = {
    "uvicorn-django",
    "uvicorn-flask",
    "uvicorn-run",
    "serve-asgi",
    "gunicorn-sync-flask",
    "gunicorn-gthread-django",
    "gunicorn-uvicorn-django",
    "hypercorn-django",
    "aiohttp-gunicorn",
}


def _forged_through(front: int, ip: str) -> bytes:
    """A client behind the balancer sends a PROXY header of its own: what comes back."""
    forged = build(1, ("198.51.100.42", 1), ("127.0.0.1", 80))
    with connect_from(ip, "127.0.0.1", front, timeout=15) as s:
        s.sendall(forged + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(4096):
                answer += chunk
                if b"\r\n\r\n" in answer and b"200" not in answer.split(b"\r\n", 1)[0]:
                    break
        return answer


@pytest.mark.parametrize("name", sorted(recipes()))
def test_recipe_behind_haproxy_and_l4lb(name: str, run_recipe: Any, tmp_path: Path) -> None:
    proc, port, log = run_recipe(name)
    hport = free_port()
    body = (
        f"listen app\n    bind 127.0.0.1:{hport}\n    server app 127.0.0.1:{port} send-proxy-v2\n"
    )
    lport = free_port()
    config = config_text(f"127.0.0.1:{lport}", [f"127.0.0.1:{port}"], pool={"send_proxy": "v2"})
    pids: set[int] = set()
    with (
        haproxy(tmp_path / "haproxy", body, wait=[("127.0.0.1", hport)]),
        l4lb(tmp_path / "l4lb", config),
    ):
        for front in (hport, lport):
            for ip in CLIENTS:
                with connect_from(ip, "127.0.0.1", front, timeout=15) as s:
                    own = s.getsockname()[1]
                    for _ in range(2):  # keep-alive: the second request keeps the address
                        info, keep_alive = _get(s)
                        assert info["client"] == [ip, own], (name, front, info)
                        pids.add(info["pid"])
                        if not keep_alive:
                            # Only gunicorn's sync worker closes after each response.
                            assert name == "gunicorn-sync-flask", name
                            break
            # A client's own header behind the balancer is only bytes of a bad request.
            answer = _forged_through(front, "127.0.0.7")
            # (the 400's body may quote the bad line; the app never ran).
            assert answer == b"" or answer.split(b" ", 2)[1] == b"400", answer
        # A forged header straight from an untrusted peer: closed, nothing answered.
        with connect_from("127.0.0.9", "127.0.0.1", port) as s:
            forged = build(1, ("198.51.100.42", 1), ("127.0.0.1", port))
            # The server may close before the bytes arrive (``required`` reads nothing from an
            # untrusted peer): a reset on the send is the same answer.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(forged + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert closed_by_peer(s), name
        if name in MULTI_WORKER:
            workers = _group_members(proc.pid) - {proc.pid}
            assert len(workers) >= 2, workers  # several processes serve
            victim = next(iter(pids))
            assert victim in workers, (victim, workers)
            os.kill(victim, signal.SIGKILL)
            assert wait_for(lambda: _gone(victim), 10)
            for ip in CLIENTS * 3:  # the others keep serving, with the real client
                with connect_from(ip, "127.0.0.1", hport, timeout=15) as s:
                    info, _ = _get(s)
                    assert info["client"][0] == ip and info["pid"] != victim, (name, info)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text
    assert "rejected 127.0.0.9:" in text, text  # the refusal is logged, with the peer
