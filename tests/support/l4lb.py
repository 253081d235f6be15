"""Run the real ``l4lb run`` in a subprocess for end-to-end tests, and stop it by PID.

    with l4lb(tmp_path, config_text("127.0.0.1:%d" % port, ["127.0.0.1:9001"])) as lb:
        ...  # lb.port, lb.access_lines(), lb.log_text(), lb.reload()

The config, the balancer's stderr (``l4lb.log``) and its access log (``access.log``) are kept in
the test's folder, so a failing test shows what the balancer said.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.logs import complete_text, json_lines, wait_line
from tests.support.peers import free_port, stop_process, wait_for


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def _table(values: Mapping[str, Any]) -> str:
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items())


def config_text(
    bind: str,
    backends: Sequence[str | Mapping[str, Any]],
    *,
    pool: Mapping[str, Any] | None = None,
    listener: Mapping[str, Any] | None = None,
    top: Mapping[str, Any] | None = None,
    health: Mapping[str, Any] | None = None,
    access_log: str = "access.log",
) -> str:
    """A one-listener, one-pool config (``workers = 1``); extra keys go in the named tables."""
    entries = [{"address": b} if isinstance(b, str) else dict(b) for b in backends]
    text = _table({"workers": 1, "drain_timeout": "5s", **(top or {})})
    text += f"\n[log]\naccess = {_toml_value(access_log)}\n"
    text += "\n[[listeners]]\n" + _table(
        {"name": "main", "bind": bind, "pool": "main", **(listener or {})}
    )
    text += "\n[pools.main]\n" + _table({**(pool or {}), "backends": entries})
    if health:
        text += "\n[pools.main.health]\n" + _table(health)
    return text


def hostport(bind: str) -> tuple[str, int]:
    host, _, port = bind.rpartition(":")
    return host.strip("[]"), int(port)


@dataclass
class L4lb:
    """A running ``l4lb run`` process and where its files are."""

    proc: subprocess.Popen[bytes]
    workdir: Path
    config_path: Path
    binds: list[tuple[str, int]]

    @property
    def host(self) -> str:
        return self.binds[0][0]

    @property
    def port(self) -> int:
        return self.binds[0][1]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        """What the balancer wrote to stderr so far, complete lines only.

        Its log lines are written by a thread (logging never blocks the loop), so a line about
        an event can come a moment after the event, and a read can catch a line half written:
        that partial tail is left out. To see a line that is due, :meth:`wait_log`.
        """
        return complete_text(self.workdir / "l4lb.log")

    def wait_log(self, needle: str, count: int = 1, timeout: float = 10.0) -> str:
        """Wait until ``needle`` stands in the log ``count`` times or more; the log's text."""
        return wait_line(self.workdir / "l4lb.log", needle, count, timeout)

    def access_lines(self) -> list[dict[str, Any]]:
        """The access log's complete JSON lines so far (``access.log`` in the work folder).

        The balancer may be writing a line right now: its partial tail is left out.
        """
        return json_lines(self.workdir / "access.log")

    def wait_access(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until the access log has at least ``count`` lines; return them."""
        wait_for(lambda: len(self.access_lines()) >= count, timeout)
        return self.access_lines()

    def rss_kib(self) -> int:
        """The balancer's resident memory (VmRSS) in KiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def write_config(self, text: str) -> None:
        self.config_path.write_text(text)

    def reload(self, text: str | None = None, wait_for_log: bool = True) -> None:
        """Optionally rewrite the config, then SIGHUP; wait for the reload's log line."""
        if text is not None:
            self.write_config(text)
        before = self.log_text().count("event=reload")
        self.proc.send_signal(signal.SIGHUP)
        if wait_for_log:
            wait_for(lambda: self.log_text().count("event=reload") > before, 10.0)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait for the exit, return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_l4lb(workdir: Path, config: str, wait: bool = True, args: Sequence[str] = ()) -> L4lb:
    """Write ``config`` to ``workdir/l4lb.toml`` and start ``l4lb run`` on it."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "l4lb.toml"
    path.write_text(config)
    import tomllib

    binds = [hostport(lst["bind"]) for lst in tomllib.loads(config).get("listeners", [])]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "l4lb", "run", "--config", str(path), *args],
        cwd=workdir,
        stdout=open(workdir / "stdout.log", "wb"),  # noqa: SIM115
        stderr=open(workdir / "l4lb.log", "wb"),  # noqa: SIM115
        env=env,
    )
    lb = L4lb(proc, workdir, path, binds)
    if wait:
        # Wait for the "started" log line rather than probing the ports: a probe connection
        # would go through to a backend and show up in its logs and the access log.
        deadline = time.monotonic() + 20
        while "event=started" not in lb.log_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_process(proc)
                raise RuntimeError(f"l4lb did not start (exit {proc.returncode}):\n{lb.log_text()}")
            time.sleep(0.02)
    return lb


@contextlib.contextmanager
def l4lb(workdir: Path, config: str, wait: bool = True) -> Iterator[L4lb]:
    """Run ``l4lb run`` on ``config`` for the duration of the block; stopped by PID after."""
    lb = start_l4lb(workdir, config, wait=wait)
    try:
        yield lb
    finally:
        stop_process(lb.proc, timeout=15)


__all__ = ["L4lb", "config_text", "free_port", "hostport", "l4lb", "start_l4lb"]
