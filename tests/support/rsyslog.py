"""A real rsyslogd for tests, in the test's folder: imuxsock on a socket there, imudp and imtcp
on free loopback ports, every message written by omfile as one JSON object of the fields
rsyslog parsed (facility, severity, timestamp, hostname, app-name, procid, msgid, msg).

It runs in the foreground (``-n``) with its own config and pid file (``-f``, ``-i``), never
touches /dev/log (``SysSock.Use="off"``), and is stopped by its PID.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

from tests.support.logs import json_lines
from tests.support.peers import free_port, stop_process, wait_for

RSYSLOGD = "/usr/sbin/rsyslogd"

_CONFIG = """\
global(workDirectory="{dir}/work" maxMessageSize="8k")
module(load="imuxsock" SysSock.Use="off")
module(load="imudp")
module(load="imtcp")
input(type="imuxsock" Socket="{dir}/log.sock" UseSpecialParser="off" ParseHostname="on")
input(type="imudp" address="127.0.0.1" port="{udp}")
input(type="imtcp" address="127.0.0.1" port="{tcp}")
template(name="fields" type="list" option.jsonf="on") {{
  property(outname="facility" name="syslogfacility" format="jsonf" datatype="number")
  property(outname="severity" name="syslogseverity" format="jsonf" datatype="number")
  property(outname="timestamp" name="timereported" dateFormat="rfc3339" format="jsonf")
  property(outname="hostname" name="hostname" format="jsonf")
  property(outname="app_name" name="app-name" format="jsonf")
  property(outname="procid" name="procid" format="jsonf")
  property(outname="msgid" name="msgid" format="jsonf")
  property(outname="input" name="inputname" format="jsonf")
  property(outname="msg" name="msg" format="jsonf")
}}
action(type="omfile" file="{dir}/messages.jsonl" template="fields")

# docs/operations.md's snippet: the access log as plain JSON lines, in a file of its own
template(name="l4lb-json" type="string" string="%msg%\n")
if $app-name == "{tag}" and $msgid == "access" then {{
    action(type="omfile" file="{dir}/access.log" template="l4lb-json")
    stop
}}
"""


def _free_udp_and_tcp_port() -> int:
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port for UDP and TCP")


def _udp_bound(port: int) -> bool:
    """Whether a UDP socket is bound to 127.0.0.1:port (/proc/net/udp, no packet sent)."""
    want = f"0100007F:{port:04X}"
    lines = Path("/proc/net/udp").read_text().splitlines()[1:]
    return any(line.split()[1] == want for line in lines)


def _tcp_listening(port: int) -> bool:
    want = f"0100007F:{port:04X}"
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(line.split()[1] == want and line.split()[3] == "0A" for line in lines)


class Rsyslog:
    """``rsyslogd -n`` on its own config in ``workdir``; ``start()``, ``kill()``, ``stop()``."""

    def __init__(self, workdir: Path, tag: str = "l4lb") -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "work").mkdir(exist_ok=True)
        self.udp_port = _free_udp_and_tcp_port()
        self.tcp_port = _free_udp_and_tcp_port()
        self.conf = self.dir / "rsyslog.conf"
        self.conf.write_text(
            _CONFIG.format(dir=self.dir, udp=self.udp_port, tcp=self.tcp_port, tag=tag)
        )
        self.socket_path = self.dir / "log.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def targets(self) -> dict[str, str]:
        """The l4lb ``[log] access`` value for each of its inputs."""
        return {
            "unix": f"syslog:{self.socket_path}",
            "udp": f"syslog+udp://127.0.0.1:{self.udp_port}",
            "tcp": f"syslog+tcp://127.0.0.1:{self.tcp_port}",
        }

    def start(self) -> Rsyslog:
        with (self.dir / "rsyslogd.log").open("ab") as out:
            self.proc = subprocess.Popen(
                [RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.dir / "rsyslogd.pid")],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        ready = wait_for(
            lambda: (
                self.proc is not None
                and self.proc.poll() is None
                and self.socket_path.exists()
                and _udp_bound(self.udp_port)
                and _tcp_listening(self.tcp_port)
            ),
            20,
        )
        if not ready:
            self.stop()
            raise RuntimeError(f"rsyslogd did not start:\n{self.output()}")
        return self

    def output(self) -> str:
        path = self.dir / "rsyslogd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def messages(self) -> list[dict[str, Any]]:
        """What rsyslog wrote so far, one parsed object per message (but the access log's,
        which the documented filter takes: :meth:`access_lines`)."""
        return json_lines(self.dir / "messages.jsonl")

    def access_lines(self) -> list[dict[str, Any]]:
        """The access log as the documented snippet writes it: the JSON lines alone."""
        return json_lines(self.dir / "access.log")

    def kill(self) -> None:
        """SIGKILL by PID: gone at once, as a crashed collector is."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def __enter__(self) -> Rsyslog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["RSYSLOGD", "Rsyslog"]
