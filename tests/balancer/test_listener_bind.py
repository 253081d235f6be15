"""How listeners bind: a wildcard IPv6 bind is dual-stack; a second instance is refused.

``bind = "[::]:PORT"`` takes IPv4 clients too, even where ``net.ipv6.bindv6only = 1``. The
sysctl is per network namespace: the balancer, its backend and the clients run in a private one
(``unshare -n``) with the sysctl set, so the machine's own setting is never touched.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.balancer.helpers import backend, connect, hello, recv_all
from tests.support.l4lb import config_text, l4lb
from tests.support.peers import free_port, stop_process

ROOT = Path(__file__).resolve().parents[2]

INSIDE = r"""
import json, socket, sys
from pathlib import Path
from tests.balancer.helpers import backend, hello, recv_all
from tests.support.l4lb import config_text, l4lb

out = {}
with backend(hello) as be, l4lb(Path(sys.argv[1]), config_text(
    "[::]:18443", [be.address], top={"workers": int(sys.argv[2])}
)) as lb:
    for name, family, host in (("v4", socket.AF_INET, "127.0.0.1"), ("v6", socket.AF_INET6, "::1")):
        try:
            with socket.socket(family) as s:
                s.settimeout(10)
                s.connect((host, 18443))
                s.shutdown(socket.SHUT_WR)
                out[name] = recv_all(s).decode()
        except OSError as err:
            out[name] = repr(err)
    out["log"] = lb.log_text()
print(json.dumps(out))
"""


def _client(answer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client address in the backend's "client=('HOST', PORT)" line, or None."""
    if not answer.startswith("client=('"):
        return None
    return ipaddress.ip_address(answer.split("'")[1])


@pytest.mark.parametrize("workers", [1, 2])
def test_wildcard_v6_bind_is_dual_stack(tmp_path: Path, workers: int) -> None:
    script = (
        "ip link set lo up && sysctl -qw net.ipv6.bindv6only=1 && "
        f'exec "{sys.executable}" -c "$0" "$1" "$2"'
    )
    result = subprocess.run(
        ["unshare", "-n", "sh", "-c", script, INSIDE, str(tmp_path / "lb"), str(workers)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert _client(out["v4"]) == ipaddress.ip_address("::ffff:127.0.0.1"), out  # v4-mapped
    assert _client(out["v6"]) == ipaddress.ip_address("::1"), out
    assert "Traceback" not in out["log"]


# -- A second ``l4lb run`` on a config already running exits 3 instead of sharing the ports.
#
# The listening sockets use SO_REUSEPORT (workers, reloads), so without a check the second process
# bound too and silently took about half of the new connections.


@pytest.mark.parametrize("workers", [1, 2])
def test_second_instance_exits_3_and_the_first_keeps_every_connection(
    tmp_path: Path, workers: int
) -> None:
    port = free_port()
    with backend(hello) as be:
        text = config_text(f"127.0.0.1:{port}", [be.address])
        with l4lb(tmp_path / "first", text) as lb:
            second = tmp_path / "second.toml"
            second.write_text(text.replace("workers = 1", f"workers = {workers}"))
            err = tmp_path / "second.log"
            proc = subprocess.Popen(
                [sys.executable, "-m", "l4lb", "run", "--config", str(second)],
                stdout=subprocess.DEVNULL,
                stderr=open(err, "wb"),  # noqa: SIM115
            )
            try:
                code = proc.wait(30)
            finally:
                stop_process(proc)  # SIGTERM: a supervisor also stops its workers
            stderr = err.read_text()
            assert code == 3, stderr
            assert f"listeners[0].bind: cannot bind 127.0.0.1:{port}" in stderr
            assert "already in use" in stderr
            assert "Traceback" not in stderr
            for _ in range(20):
                with connect(port) as s:
                    s.shutdown(socket.SHUT_WR)
                    assert recv_all(s).startswith(b"client=")
            assert len(lb.wait_access(20)) == 20  # all 20 went through the first instance
