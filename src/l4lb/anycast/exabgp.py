"""ExaBGP as l4lb's child process, driven through its process API.

l4lb writes ExaBGP's configuration (one ``neighbor`` block per router, the JSON encoder,
``neighbor-changes``) into a private directory, starts ``python -m exabgp server`` with
``PR_SET_PDEATHSIG`` (it dies with l4lb, SIGKILL included), and listens on a Unix socket that
ExaBGP's API process (:mod:`l4lb.anycast.bridge`) connects to. Routes are ``announce route
VIP next-hop self`` / ``withdraw route VIP next-hop self`` lines; session states come from
ExaBGP's JSON ``{"type": "state", "neighbor": {..., "state": "up"}}`` messages.

ExaBGP keeps announcing what an API process announced after that process ends, so nothing
here relies on it noticing l4lb is gone: the bridge stops ExaBGP when l4lb's socket closes,
and the kernel stops it when l4lb dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from l4lb.anycast.lifetime import die_with_parent
from l4lb.anycast.state import SessionState, SpeakerState
from l4lb.config.anycast import AnycastConfig

log = logging.getLogger("l4lb.anycast")

RESTART_PAUSE = 1.0
"""Seconds between an unexpected exit of ExaBGP and its restart."""


def render_config(config: AnycastConfig, bridge: Sequence[str]) -> str:
    """ExaBGP's configuration for ``[anycast]``; ``bridge`` is the API process's command line."""
    families = sorted({"ipv4" if ":" not in v else "ipv6" for v in config.vips})
    run = " ".join(bridge)
    lines = [
        "process l4lb {",
        f"    run {run};",
        "    encoder json;",
        "}",
        "",
    ]
    for nb in config.neighbors:
        lines += [
            f"neighbor {nb.address} {{",
            f"    router-id {config.router_id};",
            f"    local-as {config.local_as};",
            f"    peer-as {nb.remote_as};",
            f"    hold-time {config.hold_time};",
            "    group-updates false;",
        ]
        if nb.local_address is not None:
            lines.append(f"    local-address {nb.local_address};")
        lines.append("    family {")
        lines += [f"        {family} unicast;" for family in families]
        lines += [
            "    }",
            "    api {",
            "        processes [ l4lb ];",
            "        neighbor-changes;",
            "    }",
            "}",
            "",
        ]
    return "\n".join(lines)


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            # run as this user: the API process must reach l4lb's socket
            "exabgp.daemon.user": pwd.getpwuid(os.getuid()).pw_name,
            "exabgp.daemon.drop": "false",
            "exabgp.daemon.daemonize": "false",
            "exabgp.api.cli": "false",  # no named pipes in a shared /run
            "exabgp.api.ack": "false",
            "exabgp.api.respawn": "false",
            "exabgp.log.destination": "stderr",
            "exabgp.log.level": "WARNING",
            "exabgp.tcp.bind": "",  # connect to the routers; never listen on port 179
        }
    )
    return env


def route_line(action: str, vip: str) -> bytes:
    """One process-API command: ``announce`` or ``withdraw`` ``vip`` with this node as next hop."""
    return f"{action} route {vip} next-hop self\n".encode("ascii")


def parse_message(line: bytes) -> tuple[str, SessionState, str] | None:
    """A neighbour state change from one JSON line: (peer address, state, reason), else None."""
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("type") != "state":
        return None
    neighbor = doc.get("neighbor")
    if not isinstance(neighbor, dict):
        return None
    try:
        peer = str(neighbor["address"]["peer"])
        state = SessionState(neighbor["state"])
    except (KeyError, TypeError, ValueError):
        return None
    return peer, state, str(neighbor.get("reason", ""))


class ExaBgp:
    """One ExaBGP child: start, keep the wanted routes announced, restart if it dies, stop.

    ``routes`` is what should be announced; after a (re)start the whole set is sent again.
    ``sessions`` maps each router's address to its :class:`SessionState`.
    """

    def __init__(
        self,
        config: AnycastConfig,
        command: Sequence[str] | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.workdir = Path("/nonexistent")
        self.command = list(command or [sys.executable, "-m", "exabgp", "server"])
        self.on_change = on_change
        self.state = SpeakerState.STOPPED
        self.sessions: dict[str, SessionState] = {
            nb.address: SessionState.DOWN for nb in config.neighbors
        }
        self.session_changes: dict[str, float] = {}
        self.routes: set[str] = set()
        self.restarts = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._server: asyncio.AbstractServer | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._closing = False
        self._restart_at: float | None = None

    @property
    def socket_path(self) -> Path:
        return self.workdir / "api.sock"

    # -- life cycle ------------------------------------------------------------------------

    async def start(self, workdir: Path) -> None:
        """Listen for the bridge, write the configuration into ``workdir``, start ExaBGP."""
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._server = await asyncio.start_unix_server(self._bridge, path=str(self.socket_path))
        bridge = [sys.executable, "-m", "l4lb.anycast.bridge", str(self.socket_path)]
        conf = self.workdir / "exabgp.conf"
        conf.write_text(render_config(self.config, bridge), encoding="utf-8")
        self._spawn()

    def _spawn(self) -> None:
        conf = self.workdir / "exabgp.conf"
        self.state = SpeakerState.STARTING
        self.process = subprocess.Popen(
            [*self.command, str(conf)],
            stdin=subprocess.DEVNULL,
            env=_environment(),
            preexec_fn=die_with_parent,
            cwd=str(self.workdir),
        )
        log.info("event=exabgp_started pid=%d neighbors=%d", self.process.pid, len(self.sessions))

    def poll(self) -> None:
        """Notice an ExaBGP that exited on its own, and restart it after :data:`RESTART_PAUSE`."""
        if self._closing:
            return
        proc = self.process
        if proc is not None and proc.poll() is not None:
            log.error("event=exabgp_exited pid=%d status=%s", proc.pid, proc.returncode)
            self.process = None
            self._lost()
            self.state = SpeakerState.FAILED
            self._restart_at = time.monotonic() + RESTART_PAUSE
        restart = self._restart_at
        if self.process is None and restart is not None and time.monotonic() >= restart:
            self._restart_at = None
            self.restarts += 1
            self._spawn()

    def stop_from_thread(self) -> None:
        """Stop ExaBGP now (the watchdog's call, from another thread): its sessions close."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)

    async def close(self) -> None:
        """Stop ExaBGP (SIGTERM: it closes its sessions with a NOTIFICATION) and wait for it."""
        self._closing = True
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            deadline = time.monotonic() + 3.0
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if proc.poll() is None:
                proc.kill()
                await asyncio.sleep(0)
                proc.wait()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._server is not None:
            self._server.close()
            self._server = None
        self._lost()
        self.state = SpeakerState.STOPPED

    def _lost(self) -> None:
        self._writer = None
        for peer in self.sessions:
            self._session(peer, SessionState.DOWN, "exabgp stopped")

    # -- routes ----------------------------------------------------------------------------

    def set_routes(self, wanted: set[str]) -> None:
        """Announce what is new in ``wanted``, withdraw what left it."""
        for vip in sorted(wanted - self.routes):
            self._send(route_line("announce", vip))
            log.warning("event=vip_announced vip=%s", vip)
        for vip in sorted(self.routes - wanted):
            self._send(route_line("withdraw", vip))
            log.warning("event=vip_withdrawn vip=%s", vip)
        self.routes = set(wanted)

    def _send(self, line: bytes) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(line)

    # -- the bridge ------------------------------------------------------------------------

    async def _bridge(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = writer
        self.state = SpeakerState.RUNNING
        for vip in sorted(self.routes):
            writer.write(route_line("announce", vip))
        log.info("event=exabgp_api_connected routes=%d", len(self.routes))
        try:
            while True:
                line = await reader.readline()
                if not line.endswith(b"\n"):
                    break  # EOF (a partial last line is not a message)
                message = parse_message(line)
                if message is not None:
                    peer, state, reason = message
                    self._session(peer, state, reason)
        except (ConnectionError, asyncio.LimitOverrunError, ValueError) as err:
            log.error("event=exabgp_api_error error=%r", str(err))
        finally:
            if self._writer is writer:
                self._writer = None
                if not self._closing:
                    # ExaBGP keeps announcing what its API process announced after that
                    # process ends: without the bridge a withdraw could no longer reach it.
                    log.error("event=exabgp_api_lost action=restart_exabgp")
                    self.state = SpeakerState.STARTING
                    self.stop_from_thread()
            writer.close()

    def _session(self, peer: str, state: SessionState, reason: str) -> None:
        if self.sessions.get(peer) is state:
            return
        self.sessions[peer] = state
        self.session_changes[peer] = time.time()
        log.warning("event=bgp_session neighbor=%s state=%s reason=%r", peer, state.value, reason)
        if self.on_change is not None:
            self.on_change()
