"""Helpers for tests that run a real ``l4lb run`` and talk to its admin API."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.logs import complete_text, wait_line
from tests.support.peers import free_port, stop_process

L4LB = str(Path(sys.executable).parent / "l4lb")


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    config: Path
    log: Path
    admin: str
    """host:port of the admin API."""

    def log_text(self) -> str:
        """The balancer's log so far, complete lines only (a thread writes it)."""
        return complete_text(self.log)

    def wait_log(self, needle: str, count: int = 1, timeout: float = 10.0) -> str:
        """Wait until ``needle`` stands in the log ``count`` times or more; the log's text."""
        return wait_line(self.log, needle, count, timeout)

    def get(self, path: str) -> tuple[int, bytes]:
        return http(f"http://{self.admin}{path}")

    def post(self, path: str, token: str | None = None) -> tuple[int, bytes]:
        return http(f"http://{self.admin}{path}", "POST", token)

    def port(self, listener: str) -> int:
        """The port a listener is bound to."""
        for lst in self.status()["listeners"]:
            if lst["name"] == listener:
                return int(lst["bind"].rsplit(":", 1)[1])
        raise KeyError(listener)

    def status(self) -> dict[str, Any]:
        code, body = self.get("/status")
        assert code == 200, body
        doc: dict[str, Any] = json.loads(body)
        return doc

    def backend(self, pool: str, address: str) -> dict[str, Any]:
        for p in self.status()["pools"]:
            if p["name"] == pool:
                for b in p["backends"]:
                    if b["address"] == address:
                        return dict(b)
        raise KeyError((pool, address))

    def wait_state(self, pool: str, address: str, state: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.backend(pool, address)
            if last["state"] == state:
                return
            time.sleep(0.05)
        raise AssertionError(f"{pool}/{address} not {state} after {timeout}s: {last}")


def http(url: str, method: str = "GET", token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@contextlib.contextmanager
def l4lb_run(workdir: Path, config: str, env: dict[str, str] | None = None) -> Iterator[Running]:
    """Run ``l4lb run --config`` with ``config`` until the block ends (stopped by PID).

    Configs bind port 0 (listeners and ``[admin]``), so no other process can take a port
    between choosing and binding it: the admin port is read from the log, listener ports from
    /status (``Running.port(name)``).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "l4lb.toml"
    path.write_text(config)
    log = workdir / "l4lb.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [L4LB, "run", "--config", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    try:
        deadline = time.monotonic() + 20
        admin = None
        while admin is None:
            found = re.search(r"event=admin_listening url=http://([^/]+)/", log.read_text())
            if found:
                admin = found.group(1)
            elif proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"l4lb did not start its admin API:\n{log.read_text()}")
            else:
                time.sleep(0.02)
        yield Running(proc, path, log, admin)
    finally:
        stop_process(proc, timeout=15)


class Ports(dict[str, int]):
    """Free loopback ports by name, distinct, from free_port (outside the ephemeral range)."""

    def __missing__(self, name: str) -> int:
        while True:
            port = free_port()
            if port in self.values():
                continue
            self[name] = port
            return port


def eventually(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout}s: {what}")
        time.sleep(0.05)
